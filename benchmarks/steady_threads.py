"""Steady-state 4-bit GEMV at 1 and 2 threads, idle and beside 2 busy processes (issue 18).

Run ``python benchmarks/steady_threads.py [--calls N]``. Unlike ``python -m lightning_qlora.bench
kernels`` (median of a few calls per row), every setting runs ``N`` calls in a row, as a generation
loop does, so the loop sites' thread choice settles and the mean includes every slow call (a
helper descheduled mid-chunk); it prints mean and median ms per call of ``linear_4bit`` on a
4096x4096 NF4 weight at batch 1 and 8.
"""

from __future__ import annotations

import lightning_qlora  # noqa: F401, I001 -- first, so OpenMP threads sleep between ops

import argparse
import statistics
import subprocess
import sys
import time

import torch

from lightning_qlora.ops import op
from lightning_qlora.quantization import get_codebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    code = get_codebook("nf4")
    packed, absmax = op("quantize_4bit")(torch.randn(4096, 4096), code, 64)

    def timed(batch: int, threads: int) -> str:
        torch.set_num_threads(threads)
        x, times = torch.randn(batch, 4096), []
        for _ in range(args.calls):
            start = time.perf_counter()
            op("linear_4bit")(x, packed, absmax, code, 64, [4096, 4096])
            times.append((time.perf_counter() - start) * 1000)
        return f"{statistics.mean(times):.2f}/{statistics.median(times):.2f}"

    def report(phase: str) -> None:
        for batch in (1, 8):
            print(f"{phase:6s} batch {batch}: 1 thread {timed(batch, 1)}  2 threads {timed(batch, 2)}  (mean/median ms)")

    report("idle")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        report("busy2")
    finally:
        for process in busy:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
