"""The main job's training step on an idle machine and beside busy processes: 2 threads, 1, adaptive.

Run: ``python benchmarks/busy_training.py [--busy N] [--steps S] [--blocks B]`` (SmolLM2-135M, NF4+DQ,
LoRA r=16 on every linear layer, batch 8 of iso_dates, fp32 compute, AdamW; one process).

Blocks alternate idle / beside ``N`` busy processes (``lightning_qlora.bench.kernels.busy_processes``,
paused with SIGSTOP for the idle blocks); in every block each arm runs ``S`` steps in turn: torch on
2 threads, on 1, and :class:`lightning_qlora.threads.StepThreads` (what ``NF4Precision(adaptive_threads=True)``
runs each step through), whose chooser lives across the blocks -- each change of load is one it
must notice, and the steps it spends noticing are counted. Prints the median seconds per step per
arm and load, and the adaptive arm against the better fixed count.

OpenMP's wait policy decides how a 2-thread team fares beside busy processes: the script imports
``lightning_qlora`` first (``GOMP_SPINCOUNT=2000``); ``GOMP_SPINCOUNT=300000 python ...`` gives
GNU OpenMP's default, what a script that imports ``torch`` first gets.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator

import lightning_qlora  # noqa: F401  (before torch: sets OpenMP's wait policy unless you did)
import torch

ARMS = ("2 threads", "1 thread", "adaptive")


def _steps(steps: int, seed: int) -> Iterator[float]:
    """An endless supply of the main job's training steps (fp32) over its first ``steps`` batches; yields seconds."""
    from lightning_qlora.lm_loss import causal_lm_loss
    from main_job import training_setup  # benchmarks/ is on sys.path when this runs as a script

    model, _, batches, optimizer = training_setup(seed, steps, compute_dtype="fp32")
    for batch in itertools.cycle(batches):
        start = time.perf_counter()
        loss = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from lightning_qlora import _openmp
    from lightning_qlora.bench.kernels import busy_processes
    from lightning_qlora.threads import StepThreads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the busy blocks")
    parser.add_argument("--steps", type=int, default=6, help="steps per arm and block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks, alternating idle and busy (from idle)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    team = 2
    previous = torch.get_num_threads()
    step = _steps(32, args.seed)
    for _ in range(2):  # warm-up: caches, the allocator, the kernels' thread choices
        next(step)
    chooser = StepThreads(threads=team)
    times: dict[tuple[str, str], list[float]] = {}
    counts: dict[str, list[int]] = {"idle": [], "busy": []}
    try:
        with busy_processes(args.busy) as busy:
            for block in range(args.blocks):
                load = "idle" if block % 2 == 0 else "busy"
                busy.pause() if load == "idle" else busy.resume()
                for arm in ARMS:
                    for _ in range(args.steps):
                        if arm == "adaptive":
                            with chooser.step() as threads:
                                seconds = next(step)
                            counts[load].append(threads)
                        else:
                            torch.set_num_threads(team if arm == "2 threads" else 1)
                            seconds = next(step)
                        times.setdefault((load, arm), []).append(seconds)
                    torch.set_num_threads(previous)
    finally:
        torch.set_num_threads(previous)
    print(f"OpenMP wait policy: {_openmp.wait_policy()}; {args.busy} busy processes in the busy blocks; "
          f"{args.steps} steps per arm and block, {args.blocks} blocks")
    print(f"{'load':6s}" + "".join(f"{arm:>12s}" for arm in ARMS) + f"{'adaptive / best fixed':>24s}  threads chosen")
    for load in ("idle", "busy"):
        medians = {arm: statistics.median(times[(load, arm)]) for arm in ARMS if (load, arm) in times}
        if len(medians) < len(ARMS):
            continue
        best = min(medians["2 threads"], medians["1 thread"])
        chosen = counts[load]
        print(
            f"{load:6s}" + "".join(f"{medians[arm]:>11.2f}s" for arm in ARMS)
            + f"{medians['adaptive'] / best:>23.2f}x  2: {chosen.count(team)}, 1: {chosen.count(1)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
