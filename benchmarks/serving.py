"""Load generator: N concurrent clients over M adapters against the LitServe server on 127.0.0.1,
compared in the same run with PEFT's mixed-adapter batch (``adapter_names=``) on the same NF4 base.

The base is SmolLM2-135M-Instruct quantized to NF4 (block 64, double quantization). Our server
quantizes it with lightning_qlora; the PEFT baseline wraps bitsandbytes ``Linear4bit`` layers
quantized from the same float weights -- bit-identical codes (checked below) -- with the same
adapters, and runs each wave of concurrent requests as one ``generate(..., adapter_names=...)``
batch (left-padded, greedy), which is how PEFT serves mixed adapters (a sub-batch loop per adapter).

Both sides get the same requests (prompt, adapter, max_tokens, greedy) and must generate the same
number of tokens; the report gives throughput (generated tokens / wall time), request latency
percentiles and the server's pool occupancy.

Usage:
    python benchmarks/serving.py --clients 4 --adapters 4 --requests-per-client 3 --max-tokens 24

Against another engine (``--peer``): any OpenAI-compatible server that serves the float model as
``base`` and the same adapters under the same names gets the same clients in the same run. The
adapters must exist before that server starts, so write them to a directory first:

    python benchmarks/serving.py --adapters-dir runs/bench-adapters --print-peer-command   # prints the vLLM command
    <start that command in another terminal, wait until it answers>
    python benchmarks/serving.py --adapters-dir runs/bench-adapters --peer http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for sleeping well.",
    "Explain recursion to a child.",
    "Translate 'good morning' to Spanish.",
    "Name a prime number above 50.",
]
PEFT_BASE = "__base__"  # PEFT's adapter_names entry for "no adapter"
TARGETS = (
    ["q_proj", "v_proj"],
    "all-linear",
    ["gate_proj", "up_proj", "down_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj"],
)


def make_adapters(model, count: int, root: Path) -> list[str]:
    """``count`` PEFT-format LoRA adapters of ranks 8/16/32 with random (non-zero) factors."""
    import copy

    from lightning_qlora.adapters import LoRAConfig, export_peft, inject_adapters

    names = []
    for i in range(count):
        rank = (8, 16, 32)[i % 3]
        adapted = copy.deepcopy(model)
        inject_adapters(adapted, LoRAConfig(r=rank, alpha=rank), TARGETS[i % len(TARGETS)])
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        export_peft(adapted, root / f"adapter-{i}")
        names.append(f"adapter-{i}")
    return names


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_clients(client, workload: list[list[tuple[str, str, int]]]) -> float:
    """One thread per client, all started together; the wall seconds until the last one finishes."""
    threads = [threading.Thread(target=client, args=(requests_of_client,)) for requests_of_client in workload]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def drive_http_clients(url: str, workload: list[list[tuple[str, str, int]]], pool_stats: bool) -> dict:
    """Run the workload's clients against an OpenAI-compatible server at ``url`` (ours or a peer's).

    Every adapter is warmed with one 1-token request first (loaded before timing, as PEFT's are).
    ``pool_stats`` polls our ``/v1/stats`` for the page pool's peak occupancy (a peer has none).
    """
    latencies: list[float] = []
    tokens = [0]
    peak = {"occupancy": 0.0, "used_pages": 0}
    lock = threading.Lock()
    done = threading.Event()

    def complete(model: str, prompt: str, max_tokens: int) -> dict:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stop": [],
        }
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        if reply.status_code != 200 or "usage" not in reply.json():
            raise RuntimeError(f"request to {url} for model {model!r} failed ({reply.status_code}): {reply.text[:300]}")
        return reply.json()

    def client(requests_of_client: list[tuple[str, str, int]]) -> None:
        for adapter, prompt, max_tokens in requests_of_client:
            start = time.perf_counter()
            reply = complete(adapter, prompt, max_tokens)
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += reply["usage"]["completion_tokens"]

    def monitor() -> None:
        while not done.is_set():
            stats = requests.get(f"{url}/v1/stats", timeout=30).json()
            if stats["used_pages"] > peak["used_pages"]:
                peak.update(stats)
            time.sleep(0.05)

    for adapter in sorted({a for w in workload for a, _, _ in w}):
        complete(adapter, "hi", 1)
    watcher = threading.Thread(target=monitor) if pool_stats else None
    if watcher is not None:
        watcher.start()
    wall = run_clients(client, workload)
    done.set()
    result = {"wall": wall, "tokens": tokens[0], "latencies": latencies}
    if watcher is not None:
        watcher.join()
        result.update(peak=peak, final=requests.get(f"{url}/v1/stats", timeout=30).json())
    return result


def run_server_load(
    adapters_dir: Path,
    workload: list[list[tuple[str, str, int]]],
    max_batch: int,
    num_pages: int = 8192,
    threads: int | None = None,
) -> dict:
    """Start our server (``lightning-qlora serve``) on a free port of 127.0.0.1 and drive the workload against it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(adapters_dir / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightning_qlora.serving.cli",
            "serve",
            f"adapters_dir={adapters_dir}",
            "model=smollm2",
            f"port={port}",
            f"num_pages={num_pages}",
            f"max_batch_size={max_batch}",
            *([f"threads={threads}"] if threads else []),
            "log_level=warning",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(1200):
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.25)
        return drive_http_clients(url, workload, pool_stats=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # LitServe forks workers: stop the whole group
        server.wait(timeout=30)
        log.close()


def peer_command(adapters_dir: Path, names: list[str], threads: int) -> str:
    """The vLLM command that serves the same float SmolLM2 and the same adapters, under the same names."""
    from lightning_qlora.models.smollm2 import default_cache_dir

    modules = " ".join(f"{name}={adapters_dir / name}" for name in names)
    return (
        f"VLLM_CPU_OMP_THREADS_BIND=0-{threads - 1} vllm serve {default_cache_dir()} --served-model-name base "
        f"--dtype float32 --enable-lora --max-lora-rank 32 --max-loras {len(names)} --lora-modules {modules} "
        "--host 127.0.0.1 --port 8000"
    )


def run_engine_in_process(float_model, tokenizer, adapters_dir: Path, workload, max_batch: int, num_pages: int) -> dict:
    """The same clients against the engine in this process (no HTTP): separates serving overhead from compute."""
    import copy

    from lightning_qlora.quantization.convert import quantize_linears
    from lightning_qlora.serving.engine import GenerationEngine
    from lightning_qlora.serving.sampling import SamplingParams

    model = copy.deepcopy(float_model)
    quantize_linears(model, "nf4", 64, True)
    engine = GenerationEngine(
        model, tokenizer, adapters_dir=adapters_dir, num_pages=num_pages, max_batch_size=max_batch
    )
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(requests_of_client: list[tuple[str, str, int]]) -> None:
        for adapter, prompt, max_tokens in requests_of_client:
            start = time.perf_counter()
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            events = list(engine.submit(text, adapter, SamplingParams(max_tokens=max_tokens)))
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += events[-1].completion_tokens

    engine.start()
    try:
        for adapter in sorted({a for w in workload for a, _, _ in w}):  # warm: adapters loaded before timing
            list(engine.submit("hi", adapter, SamplingParams(max_tokens=1)))
        wall = run_clients(client, workload)
    finally:
        engine.stop()
    return {"wall": wall, "tokens": tokens[0], "latencies": latencies}


def run_peft_baseline(float_model, tokenizer, adapters_dir: Path, names: list[str], workload) -> dict:
    """Waves of one request per client, each wave one PEFT mixed-adapter generate() call."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from lightning_qlora.quantization.tensor import quantize_4bit

    model = float_model
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=True,
            )
            weight = module.weight.detach()
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
            )
            layer = layer.to("cpu")
            if not torch.equal(
                layer.weight.data.view(-1), quantize_4bit(weight, "nf4", 64, double_quant=True).packed.view(-1)
            ):
                raise RuntimeError(f"bitsandbytes and lightning_qlora NF4 codes differ for {name}")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    peft_model = PeftModel.from_pretrained(model, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters_dir / name, adapter_name=name)
    peft_model.eval()
    tokenizer.padding_side = "left"
    waves = max(len(w) for w in workload)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for wave in range(waves):
        batch = [w[wave] for w in workload if wave < len(w)]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for _, p, _ in batch
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        wave_start = time.perf_counter()
        with torch.inference_mode():
            out = peft_model.generate(
                **enc,
                adapter_names=[PEFT_BASE if a == "base" else a for a, _, _ in batch],
                max_new_tokens=max(m for *_, m in batch),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - wave_start
        for row in out[:, enc["input_ids"].shape[1] :]:
            generated = row.tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            tokens += len([t for t in generated if t != tokenizer.pad_token_id])
            latencies.append(elapsed)
    return {"wall": time.perf_counter() - start, "tokens": tokens, "latencies": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-pages", type=int, default=8192, help="server page pool size (pages)")
    parser.add_argument("--base-only", action="store_true", help="every request uses the base model, no adapter")
    parser.add_argument(
        "--adapters-dir",
        type=Path,
        default=None,
        help="write (or reuse) the benchmark's adapters here instead of a temporary directory",
    )
    parser.add_argument(
        "--print-peer-command",
        action="store_true",
        help="write the adapters to --adapters-dir, print the vLLM command serving them, and exit",
    )
    parser.add_argument(
        "--peer",
        default=None,
        metavar="URL",
        help="also drive this OpenAI-compatible server (e.g. vLLM started with the printed command)",
    )
    args = parser.parse_args()
    if (args.print_peer_command or args.peer) and args.adapters_dir is None:
        parser.error("--peer and --print-peer-command need --adapters-dir (the peer must load the same adapter files)")
    torch.set_num_threads(args.threads)
    from lightning_qlora.models import load_smollm2

    float_model, tokenizer = load_smollm2()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters_dir or Path(tmp)
        names = [f"adapter-{i}" for i in range(args.adapters)]
        if not all((root / name / "adapter_config.json").is_file() for name in names):
            root.mkdir(parents=True, exist_ok=True)
            names = make_adapters(float_model, args.adapters, root)
        if args.print_peer_command:
            print(peer_command(root.resolve(), names, args.threads))
            return
        choices = ["base"] if args.base_only else names
        workload = [
            [(rng.choice(choices), rng.choice(PROMPTS), args.max_tokens) for _ in range(args.requests_per_client)]
            for _ in range(args.clients)
        ]
        ours = run_server_load(root, workload, args.max_batch, args.num_pages, args.threads)
        engine = run_engine_in_process(float_model, tokenizer, root, workload, args.max_batch, args.num_pages)
        peft = run_peft_baseline(float_model, tokenizer, root, names, workload)
        peer = drive_http_clients(args.peer.rstrip("/"), workload, pool_stats=False) if args.peer else None
    ours_tps, peft_tps = ours["tokens"] / ours["wall"], peft["tokens"] / peft["wall"]
    print(
        f"workload: {args.clients} clients x {args.requests_per_client} requests, {args.adapters} adapters "
        f"(ranks 8/16/32), max_tokens={args.max_tokens}, greedy, SmolLM2-135M NF4, {args.threads} threads"
    )
    print(f"{'':36s}{'tokens':>8s}{'wall s':>9s}{'tok/s':>9s}{'p50 s':>8s}{'p90 s':>8s}{'p99 s':>8s}")
    rows = [
        ("lightning_qlora (HTTP)", ours),
        ("lightning_qlora engine (in-process)", engine),
        ("PEFT adapter_names batch", peft),
    ] + ([(f"peer {args.peer}"[:36], peer)] if peer else [])
    for label, r in rows:
        lat = r["latencies"]
        print(
            f"{label:36s}{r['tokens']:8d}{r['wall']:9.2f}{r['tokens'] / r['wall']:9.2f}{statistics.median(lat):8.2f}"
            f"{percentile(lat, 0.9):8.2f}{percentile(lat, 0.99):8.2f}"
        )
    engine_tps = engine["tokens"] / engine["wall"]
    print(
        f"throughput ratio (ours / PEFT, same run): HTTP {ours_tps / peft_tps:.2f}x, engine in-process "
        f"{engine_tps / peft_tps:.2f}x"
    )
    peak = ours["peak"]
    print(
        f"pool: peak {peak['used_pages']}/{peak.get('num_pages', '?')} pages seen ({peak['occupancy']:.1%}; "
        f"kv {peak.get('kv_pages', 0)}, adapters {peak.get('adapter_pages', 0)}), page = {peak.get('page_size', '?')} "
        f"floats; adapter loads {ours['final']['adapter_loads']}, evictions {ours['final']['evictions']}"
    )
    summary = {"ours_tok_s": round(ours_tps, 3), "engine_tok_s": round(engine_tps, 3), "peft_tok_s": round(peft_tps, 3)}
    if peer:
        summary["peer_tok_s"] = round(peer["tokens"] / peer["wall"], 3)
        print(f"throughput ratio (ours / peer, same run): {ours_tps / summary['peer_tok_s']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
