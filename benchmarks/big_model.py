"""Fine-tune a model whose float weights do not fit in RAM: Llama-2-7B's shape, streamed into NF4+DQ.

Run: ``python benchmarks/big_model.py`` (about 15 minutes on 2 cores; needs ~14 GB of disk and
16 GiB of available memory). It

1. writes a synthetic checkpoint with Llama-2-7B's config (random bf16 weights, ~13.5 GB in
   4.5 GB shards; in fp32 the model would need 27 GB, more than a 24 GB machine has),
2. loads it with ``load_causal_lm(mode="nf4-dq", compute_dtype="fp32")`` in a fresh process,
   measuring wall time and peak RSS, runs 3 LoRA steps (r=16, all linear layers, AdamW) at
   batch 1 x 64 tokens and greedy-decodes 8 tokens,
3. loads the same checkpoint with transformers + bitsandbytes (NF4, double quant, fp32
   compute) in another fresh process -- its load time and peak RSS, or how it fails,
4. prints a table and deletes the checkpoint.

The two loads run one after the other, each in its own process, and a watchdog kills a process
whose RSS passes ``--rss-cap-gb`` (the machine is shared: an fp32 materialization would take
27 GB). ``--small`` runs the same steps on a ~0.3B model in a minute (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SMALL = dict(
    LLAMA2_7B,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=16,
)
GIB = 1 << 30


def _status_kb(field: str, pid: str = "self") -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:
        pass


def _available_gib() -> float:
    return _status_kb_meminfo("MemAvailable") / (1 << 20)


def _status_kb_meminfo(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))


# -- workers (each runs in its own process) ---------------------------------------------


def _worker_ours(directory: str, steps: int, tokens: int, new_tokens: int, limit_retention: bool) -> dict:
    import torch

    from lightning_qlora.adapters import LoRAConfig, adapter_param_groups, inject_adapters
    from lightning_qlora.host_memory import limit_allocator_retention
    from lightning_qlora.models import load_causal_lm

    retention_limited = limit_allocator_retention() if limit_retention else False
    torch.manual_seed(0)
    _reset_peak()
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    model, _ = load_causal_lm(directory, mode="nf4-dq", compute_dtype="fp32", progress=True)
    result = {
        "load_s": time.perf_counter() - start,
        "load_peak_gb": _status_kb("VmHWM") / 2**20,
        "load_growth_gb": (_status_kb("VmHWM") - before) / 2**20,
        "after_load_gb": _status_kb("VmRSS") / 2**20,
    }
    inject_adapters(model, LoRAConfig(r=16, alpha=32), "all-linear")
    optimizer = torch.optim.AdamW(adapter_param_groups(model, 1e-4))
    batch = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(0))
    model.train()
    _reset_peak()
    step_seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    result.update(step_s=step_seconds, losses=losses, train_peak_gb=_status_kb("VmHWM") / 2**20)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            batch[:, :8], max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, pad_token_id=0
        )
    result.update(
        generate_s=time.perf_counter() - start, generated=out.shape[1] - 8, retention_limited=retention_limited
    )
    return result


def _worker_bnb(directory: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    _reset_peak()
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=quantization, dtype=torch.float32, device_map="cpu", local_files_only=True
        )
    except Exception as error:  # noqa: BLE001 -- how it fails is the result
        return {
            "error": f"{type(error).__name__}: {str(error)[:300]}",
            "load_s": time.perf_counter() - start,
            "load_peak_gb": _status_kb("VmHWM") / 2**20,
        }
    result = {
        "load_s": time.perf_counter() - start,
        "load_peak_gb": _status_kb("VmHWM") / 2**20,
        "load_growth_gb": (_status_kb("VmHWM") - before) / 2**20,
    }
    result["linear4bit_layers"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    return result


# -- driver -------------------------------------------------------------------------------


def _run_worker(args: list[str], cap_gb: float, timeout_s: float) -> dict:
    """Run this file as a worker; kill it if its RSS passes ``cap_gb`` (a shared machine must not swap or OOM)."""
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    started = time.perf_counter()
    killed = {}

    def watch() -> None:
        while process.poll() is None:
            try:
                rss = _status_kb("VmRSS", str(process.pid)) / 2**20
            except (FileNotFoundError, ProcessLookupError):
                return
            if rss > cap_gb:
                killed["rss_gb"], killed["after_s"] = rss, time.perf_counter() - started
                process.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stdout, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    watcher.join()
    if killed:
        return {
            "error": f"RSS passed the {cap_gb:.0f} GiB cap after {killed['after_s']:.0f} s of loading "
            f"(killed by the watchdog at {killed['rss_gb']:.1f} GiB)"
        }
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        return {"error": f"exited with status {process.returncode}"}
    return json.loads(lines[-1])


def _table(checkpoint: dict, ours: dict, bnb: dict) -> str:
    def cell(result: dict, key: str, fmt: str) -> str:
        return fmt.format(result[key]) if key in result else "–"

    rows = [
        (
            "checkpoint",
            f"{checkpoint['params'] / 1e9:.2f} B params, {checkpoint['gb']:.1f} GB bf16 in "
            f"{checkpoint['shards']} shards (written in {checkpoint['write_s']:.0f} s)",
            "",
        ),
        ("load wall time", cell(ours, "load_s", "{:.0f} s"), cell(bnb, "load_s", "{:.0f} s")),
        ("peak RSS while loading", cell(ours, "load_peak_gb", "{:.2f} GiB"), cell(bnb, "load_peak_gb", "{:.2f} GiB")),
        ("RSS after loading", cell(ours, "after_load_gb", "{:.2f} GiB"), ""),
        (
            "peak RSS during 3 LoRA steps",
            cell(ours, "train_peak_gb", "{:.2f} GiB")
            + (" (allocator retention limited)" if ours.get("retention_limited") else ""),
            "",
        ),
        (
            "LoRA step (1 x 64 tokens), median",
            f"{sorted(ours['step_s'])[len(ours['step_s']) // 2]:.1f} s" if "step_s" in ours else "–",
            "",
        ),
        ("8 greedy tokens", cell(ours, "generate_s", "{:.1f} s"), ""),
    ]
    if "error" in ours or "error" in bnb:
        rows.append(("failure", ours.get("error", ""), bnb.get("error", "")))
    lines = [
        "| | lightning_qlora `load_causal_lm` (NF4+DQ) | transformers + bitsandbytes (NF4+DQ, fp32 compute) |",
        "|---|---|---|",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="a ~0.3B model instead of 7B (smoke test)")
    parser.add_argument("--skip-bnb", action="store_true", help="skip the transformers + bitsandbytes side")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's allocator as it is (by default the worker calls "
        "lightning_qlora.host_memory.limit_allocator_retention())",
    )
    parser.add_argument("--rss-cap-gb", type=float, default=14.0, help="kill a worker whose RSS passes this")
    parser.add_argument("--min-available-gb", type=float, default=16.0, help="refuse to start with less available")
    args = parser.parse_args()
    import transformers

    from lightning_qlora.models.synthetic import write_synthetic_checkpoint
    from lightning_qlora.models.tiny import tiny_tokenizer

    config_kwargs, shard_gb = (SMALL, 0.25) if args.small else (LLAMA2_7B, 4.5)
    need = 2.0 if args.small else args.min_available_gb
    if _available_gib() < need:
        sys.exit(f"only {_available_gib():.1f} GiB of memory available, this benchmark wants {need} GiB; try later.")
    directory = args.dir or Path(tempfile.mkdtemp(prefix="big_model_"))
    try:
        start = time.perf_counter()
        write_synthetic_checkpoint(transformers.LlamaConfig(**config_kwargs), directory, int(shard_gb * GIB))
        tiny_tokenizer().save_pretrained(directory)
        shards = sorted(directory.glob("model-*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        checkpoint = {
            "params": size / 2,
            "gb": size / 1e9,
            "shards": len(shards),
            "write_s": time.perf_counter() - start,
        }
        print(f"checkpoint: {checkpoint}", flush=True)
        worker = ["--worker", "ours", str(directory)] + (["--glibc-default"] if args.glibc_default else [])
        ours = _run_worker(worker, args.rss_cap_gb, 3600)
        print(f"lightning_qlora: {ours}", flush=True)
        bnb = {"error": "skipped"}
        if not args.skip_bnb:
            if _available_gib() < need:
                bnb = {"error": f"not run: only {_available_gib():.1f} GiB available"}
            else:
                bnb = _run_worker(["--worker", "bnb", str(directory)], args.rss_cap_gb, 3600)
            print(f"transformers + bitsandbytes: {bnb}", flush=True)
        print(_table(checkpoint, ours, bnb))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        kind, directory = sys.argv[2], sys.argv[3]
        limit = "--glibc-default" not in sys.argv
        result = _worker_ours(directory, 3, 64, 8, limit) if kind == "ours" else _worker_bnb(directory)
        print(json.dumps(result), flush=True)
    else:
        main()
