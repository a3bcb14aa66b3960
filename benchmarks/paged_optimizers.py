"""Step-time overhead of paged vs unpaged AdamW on CPU, per page store (``python benchmarks/paged_optimizers.py``).

50M parameters (fp32 AdamW state: 400 MB) split in 8 tensors get random gradients; each
optimizer runs ``--warmup`` steps then ``--steps`` timed steps. Printed as a markdown table:
median step time and its ratio to ``torch.optim.AdamW``. Numbers depend on the machine's load;
run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from lightning_qlora.optim import HostPageStore, MmapPageStore, PagedAdamW, PagedAdamW8bit


def _params(total: int, tensors: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(total // tensors, generator=generator)) for _ in range(tensors)]


def _median_step(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], total: int, tensors: int, warmup: int, steps: int
) -> float:
    params = _params(total, tensors)
    for param in params:
        param.grad = torch.randn_like(param) * 1e-2
    optimizer = make(params)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-mib", type=int, default=64, help="resident budget of the mmap store")
    args = parser.parse_args()
    budget = args.budget_mib << 20
    page_dir = tempfile.mkdtemp(prefix="paged-bench-")
    rows: list[tuple[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]] = [
        ("torch.optim.AdamW (unpaged)", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        ("PagedAdamW, host store", lambda ps: PagedAdamW(ps, lr=1e-3, store=HostPageStore())),
        (
            f"PagedAdamW, mmap store, {args.budget_mib} MiB budget",
            lambda ps: PagedAdamW(ps, lr=1e-3, store=MmapPageStore(page_dir, budget_bytes=budget)),
        ),
        ("PagedAdamW8bit, host store", lambda ps: PagedAdamW8bit(ps, lr=1e-3, store=HostPageStore())),
        (
            f"PagedAdamW8bit, mmap store, {args.budget_mib} MiB budget",
            lambda ps: PagedAdamW8bit(ps, lr=1e-3, store=MmapPageStore(page_dir, budget_bytes=budget)),
        ),
    ]
    results = [(name, _median_step(make, args.params, args.tensors, args.warmup, args.steps)) for name, make in rows]
    baseline = results[0][1]
    print(f"{args.params / 1e6:.0f}M parameters, {torch.get_num_threads()} threads, median of {args.steps} steps\n")
    print("| optimizer / store | step time (s) | ratio vs torch AdamW |")
    print("|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.3f} | {seconds / baseline:.2f} |")


if __name__ == "__main__":
    main()
