"""NF4 kernel speed on one weight, idle and beside busy processes: ours (raw ops and the user path), bitsandbytes, MKL dense.

Run ``python -m lightning_qlora.bench kernels [--contention N] [--size S] [--repeats R]``. Every
row is timed at 1 and 2 threads on the machine as it is ("idle") and, with ``--contention N``,
while ``N`` busy processes (pure Python spin loops) run beside the benchmark. The settings are
interleaved: a row is timed in :data:`ROUNDS` rounds, each visiting every (phase, threads)
setting in turn (the busy processes are paused with SIGSTOP for the idle phase and resumed with
SIGCONT), each visit a warm-up (long enough for our kernels to see the new load and re-choose
their thread count) and then ``R / ROUNDS`` timed calls; a setting's figure is the
median of all its calls. So a slow spell of the (shared, noisy) machine lands on every setting
alike instead of on whichever table was being timed then. The busy processes are bounded (at most
16, each exits by itself after 30 minutes) and always stopped at the end, also on an error or Ctrl-C.

Rows go through the user path too: ``Linear4bit`` forward at decode and training batch sizes,
its backward's input gradient, and the plugin's conversion of one ``nn.Linear``
(``quantize_linears``, NaN check included), beside the raw ops, bitsandbytes (CPU) and MKL dense
fp32 ``F.linear`` measured in the same run. ``contended/idle`` is the ratio at the default 2
threads; MKL dense's own ratio is the yardstick. A crossover table times the fused GEMV
against dequantize + ``F.linear`` per batch size (what ``Linear4bit.FUSED_MAX_ROWS`` is chosen by).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lightning_qlora.errors import ConfigError
from lightning_qlora.threads import usable_cores

MAX_BUSY = 16
BUSY_SECONDS = 1800
THREADS = (1, 2)
_BUSY_LOOP = f"import time\nend = time.monotonic() + {BUSY_SECONDS}\nwhile time.monotonic() < end:\n    pass\n"


@dataclass
class Row:
    """One timed operation: ``times[(phase, threads)]`` in ms, phase ``"idle"`` or ``"busy"``."""

    name: str
    group: str  # "ours", "user path", "setup" (part of a user-path row's timing), "bitsandbytes", "MKL dense"
    fn: Callable[[], object]
    repeats_scale: float = 1.0
    times: dict[tuple[str, int], float] = field(default_factory=dict)


#: Warm-up before a row is timed: at least this many calls and seconds, at most the last figure
#: in seconds (at least one call).
WARMUP_CALLS, WARMUP_SECONDS, WARMUP_MAX_SECONDS = 12, 0.5, 2.0

#: Warm-up at each visit of an interleaved setting (a new phase or thread count). Long enough for
#: our loop sites to see a new machine load (csrc/cpu/parallel.h: the load level is read over
#: ~100 ms windows, and a window that straddles the change can move it in two steps, each followed
#: by two trial calls of each choice): the timed calls then see the choice a process running beside
#: steady contention makes, not the transition (which costs at most those trial calls).
VISIT_WARMUP_CALLS, VISIT_WARMUP_SECONDS, VISIT_WARMUP_MAX_SECONDS = 8, 0.4, 2.0

#: Interleaved rounds per row (see the module docs).
ROUNDS = 3

#: Two medians closer than this (relative) are the same time on this machine: two settings that
#: run the same code (a loop site that chose one thread) differ by that much from call noise alone.
SAME_TIME = 0.03


def _warm_up(fn: Callable[[], object], calls: int, seconds: float, max_seconds: float) -> None:
    """Call ``fn`` until ``calls`` calls and ``seconds`` have passed, or ``max_seconds`` (one call at least)."""
    start = time.perf_counter()
    done = 0
    while True:
        fn()
        done += 1
        elapsed = time.perf_counter() - start
        if (done >= calls and elapsed >= seconds) or elapsed >= max_seconds:
            return


def _timed_ms(fn: Callable[[], object], calls: int) -> list[float]:
    times = []
    for _ in range(max(1, calls)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms after a warm-up.

    The warm-up (:data:`WARMUP_CALLS` calls and :data:`WARMUP_SECONDS`, within :data:`WARMUP_MAX_SECONDS`) lets
    our kernels' loop sites settle on a thread count as they do in the first calls of any longer
    run (csrc/cpu/parallel.h: two calls of each choice, then the cheaper one); timing from the
    first call would time the trial calls instead of the steady state a training step or a
    generation sees.
    """
    _warm_up(fn, WARMUP_CALLS, WARMUP_SECONDS, WARMUP_MAX_SECONDS)
    return statistics.median(_timed_ms(fn, repeats))


class BusyProcesses(list):
    """The spinning processes of :func:`busy_processes`; :meth:`pause` / :meth:`resume` switch the contention off and on."""

    def pause(self) -> None:
        """Stop every busy process (SIGSTOP): the machine is idle until :meth:`resume`."""
        for process in self:
            process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let every busy process spin again (SIGCONT)."""
        for process in self:
            process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[BusyProcesses]:
    """``count`` spinning Python processes for the duration of the block; always stopped after it."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_BUSY:
        raise ConfigError(f"--contention {count!r} must be an integer from 0 to {MAX_BUSY} (busy processes).")
    processes = BusyProcesses()
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BUSY_LOOP],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5 if count else 0.0)  # let them reach their loops
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM until resumed
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def build_rows(size: int) -> list[Row]:
    """The operations on one ``size x size`` fp32 weight (NF4 + double quantization, block 64)."""
    import bitsandbytes as bnb_nn
    import bitsandbytes.functional as bnb
    from torch import nn

    from lightning_qlora.ops import op
    from lightning_qlora.quantization import Linear4bit, quantize_4bit
    from lightning_qlora.quantization.convert import quantize_linears

    torch.manual_seed(0)
    dense = nn.Linear(size, size, bias=False)
    w = dense.weight.detach()
    ours = quantize_4bit(w, "nf4", 64)
    layer = Linear4bit(ours)
    shape = [size, size]
    bnb_packed, bnb_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_layer = bnb_nn.nn.Linear4bit(size, size, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    state = layer.state_dict()  # bitsandbytes' keys; the codes are bit-exact with its own
    stats = {k: v for k, v in state.items() if k.startswith("weight.")}
    bnb_layer.weight = bnb_nn.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    x1, x8, x64 = torch.randn(1, size), torch.randn(8, size), torch.randn(64, size)
    x_train = torch.randn(512, size)
    grad = torch.randn(512, size)

    def gemv(x: torch.Tensor) -> Callable[[], object]:
        return lambda: op("linear_4bit")(x, ours.packed, ours.block_absmax(), ours.code, 64, shape)

    def convert() -> object:  # a fresh model around the same float weight (no init cost in the timing)
        model = nn.Sequential(nn.Linear(size, size, bias=False, device="meta"))
        model[0].weight = nn.Parameter(w.clone(), requires_grad=False)
        return quantize_linears(model, skip=())

    def input_grad() -> object:
        return op("linear_4bit_input_grad")(grad, ours.packed, ours.block_absmax(), ours.code, 64, shape)

    with torch.no_grad():
        rows = [
            Row("quantize NF4+DQ (quantize_4bit)", "ours", lambda: quantize_4bit(w, "nf4", 64, check_values=False)),
            Row("  + NaN check (check_values)", "ours", lambda: quantize_4bit(w, "nf4", 64)),
            Row("dequantize -> fp32", "ours", lambda: ours.dequantize(torch.float32)),
            Row("dequantize -> bf16", "ours", lambda: ours.dequantize(torch.bfloat16)),
            Row("GEMV batch 1 (linear_4bit op)", "ours", gemv(x1)),
            Row("GEMV batch 8 (linear_4bit op)", "ours", gemv(x8)),
            Row("input grad batch 512 (op)", "ours", input_grad, 0.3),
            Row("Linear4bit fwd batch 1", "user path", lambda: layer(x1)),
            Row("Linear4bit fwd batch 8", "user path", lambda: layer(x8)),
            Row("Linear4bit fwd batch 64", "user path", lambda: layer(x64)),
            Row("Linear4bit fwd batch 512", "user path", lambda: layer(x_train), 0.3),
            Row("plugin convert 1 Linear", "user path", convert, 0.5),
            Row("  (its weight copy alone)", "setup", lambda: w.clone(), 0.5),
            Row(
                "bnb quantize NF4+DQ",
                "bitsandbytes",
                lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                0.3,
            ),
            Row("bnb dequantize -> fp32", "bitsandbytes", lambda: bnb.dequantize_4bit(bnb_packed, bnb_state), 0.5),
            Row(
                "bnb matmul_4bit batch 1",
                "bitsandbytes",
                lambda: bnb_nn.matmul_4bit(x1, bnb_packed.t(), quant_state=bnb_state),
                0.5,
            ),
            Row("bnb Linear4bit fwd batch 1", "bitsandbytes", lambda: bnb_layer(x1), 0.5),
            Row("dequantize + matmul, grad 512", "MKL dense", lambda: grad @ ours.dequantize(torch.float32), 0.3),
            Row("F.linear fp32 batch 1", "MKL dense", lambda: torch.nn.functional.linear(x1, w)),
            Row("F.linear fp32 batch 8", "MKL dense", lambda: torch.nn.functional.linear(x8, w)),
            Row("F.linear fp32 batch 512", "MKL dense", lambda: torch.nn.functional.linear(x_train, w), 0.3),
        ]
    return rows


def time_rows(rows: list[Row], repeats: int, busy: BusyProcesses | None = None) -> None:
    """Fill ``row.times[(phase, threads)]`` for every row, phase (``"idle"``, and ``"busy"`` with ``busy``) and thread count.

    Interleaved (see the module docs): per row, :data:`ROUNDS` rounds over every setting, the order
    reversed every other round; ``busy`` is paused for the idle phase and resumed for the busy one.
    """
    previous = torch.get_num_threads()
    phases = ("idle", "busy") if busy is not None else ("idle",)
    settings = [(phase, threads) for phase in phases for threads in THREADS]
    try:
        with torch.no_grad():
            for row in rows:
                calls = max(1, round(max(3, int(repeats * row.repeats_scale)) / ROUNDS))
                samples: dict[tuple[str, int], list[float]] = {setting: [] for setting in settings}
                for round_index in range(ROUNDS):
                    for phase, threads in settings if round_index % 2 == 0 else reversed(settings):
                        if busy is not None:
                            busy.pause() if phase == "idle" else busy.resume()
                        torch.set_num_threads(threads)
                        first = round_index == 0 and (phase, threads) == settings[0]
                        _warm_up(
                            row.fn,
                            WARMUP_CALLS if first else VISIT_WARMUP_CALLS,
                            WARMUP_SECONDS if first else VISIT_WARMUP_SECONDS,
                            WARMUP_MAX_SECONDS if first else VISIT_WARMUP_MAX_SECONDS,
                        )
                        samples[(phase, threads)] += _timed_ms(row.fn, calls)
                for setting, times in samples.items():
                    row.times[setting] = statistics.median(times)
    finally:
        torch.set_num_threads(previous)
        if busy is not None:
            busy.resume()


def crossover(
    size: int, repeats: int, batches: tuple[int, ...] = (1, 8, 16, 32, 64, 100)
) -> list[tuple[int, float, float]]:
    """``(batch, fused ms, dequantize + F.linear ms)`` at 2 threads for one ``size x size`` weight."""
    from lightning_qlora.ops import op
    from lightning_qlora.quantization import quantize_4bit

    weight = quantize_4bit(torch.randn(size, size), "nf4", 64)
    table = []
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, size)
            fused = median_ms(
                lambda: op("linear_4bit")(x, weight.packed, weight.block_absmax(), weight.code, 64, [size, size]),
                repeats,
            )
            split = median_ms(lambda: torch.nn.functional.linear(x, weight.dequantize(torch.float32)), repeats)
            table.append((batch, fused, split))
    return table


def fair_share_floor(busy: int, threads: int, cores: int) -> float:
    """The least busy/idle time ratio of a ``threads``-thread call that keeps every thread working when idle.

    Beside ``busy`` processes that each keep a core busy, the scheduler shares the ``cores`` equally among
    the ``busy + threads`` runnable threads: the call gets ``threads * cores / (busy + threads)`` cores
    instead of the ``min(threads, cores)`` it had idle (when that is fewer), so its CPU work takes that
    much longer -- with no wait for a descheduled thread at all. 2 busy processes beside 2 threads on 2 cores:
    2.0x. A memory-bound call can beat it (one thread at a time gets more bandwidth), and one thread can
    when the scheduler leaves it a core of its own.

    Example:
        >>> fair_share_floor(busy=2, threads=2, cores=2), fair_share_floor(busy=2, threads=2, cores=16)
        (2.0, 1.0)
    """
    if busy < 0 or threads < 1 or cores < 1:
        raise ValueError(f"busy={busy}, threads={threads}, cores={cores}: need busy >= 0, threads >= 1, cores >= 1")
    used_idle = min(threads, cores)
    used_busy = min(used_idle, threads * cores / (busy + threads))
    return max(1.0, used_idle / used_busy)


def _ratio(a: float, b: float, digits: int = 1) -> str:
    return f"{a / b:.{digits}f}x" if b > 0 else "-"


def report(rows: list[Row], contention: int) -> list[str]:
    """The side-by-side table and the issue-18 checks, as lines."""
    busy = contention > 0
    head = f"{'operation':<34}{'group':<13}{'idle 1t':>9}{'idle 2t':>9}"
    if busy:
        head += f"{f'busy{contention} 1t':>10}{f'busy{contention} 2t':>10}{'busy/idle':>10}"
    lines = [head]
    for row in rows:
        t = row.times
        line = f"{row.name:<34}{row.group:<13}{t[('idle', 1)]:>9.2f}{t[('idle', 2)]:>9.2f}"
        if busy:
            line += f"{t[('busy', 1)]:>10.2f}{t[('busy', 2)]:>10.2f}{_ratio(t[('busy', 2)], t[('idle', 2)]):>10}"
        lines.append(line)
    by_name = {row.name: row.times for row in rows}

    def idle(name: str) -> float:
        return by_name[name][("idle", 2)]

    lines += [
        "",
        "checks (idle, 2 threads):",
        f"  quantize vs bitsandbytes: {_ratio(idle('bnb quantize NF4+DQ'), idle('quantize NF4+DQ (quantize_4bit)'))}"
        " (target >= 30x)",
        f"  dequantize vs bitsandbytes: {_ratio(idle('bnb dequantize -> fp32'), idle('dequantize -> fp32'))} "
        "(target >= 3x)",
        f"  GEMV batch 1 vs bitsandbytes: {_ratio(idle('bnb matmul_4bit batch 1'), idle('GEMV batch 1 (linear_4bit op)'))}"
        f"; Linear4bit vs bnb Linear4bit: {_ratio(idle('bnb Linear4bit fwd batch 1'), idle('Linear4bit fwd batch 1'))}"
        " (target >= 10x)",
        f"  dense F.linear / Linear4bit batch 1: {_ratio(idle('F.linear fp32 batch 1'), idle('Linear4bit fwd batch 1'))}"
        " (target > 1x)",
        f"  Linear4bit / raw op, batch 1: {_ratio(idle('Linear4bit fwd batch 1'), idle('GEMV batch 1 (linear_4bit op)'), 2)}"
        " (target <= 1.2x)",
        f"  input grad: dequantize + matmul / ours: "
        f"{_ratio(idle('dequantize + matmul, grad 512'), idle('input grad batch 512 (op)'))}",
    ]
    ours = [row for row in rows if row.group in ("ours", "user path")]
    for phase in ("idle", "busy") if busy else ("idle",):
        ratios = {row.name.strip(): row.times[(phase, 2)] / row.times[(phase, 1)] for row in ours}
        slower = [f"{name} {ratio:.2f}x" for name, ratio in ratios.items() if ratio > 1 + SAME_TIME]
        tied = [f"{name} {ratio:.2f}x" for name, ratio in ratios.items() if 1 < ratio <= 1 + SAME_TIME]
        lines.append(
            f"  {phase}: ours slower at 2 threads than at 1: {', '.join(slower) or 'none'}"
            + (f" (above by at most {SAME_TIME:.0%}, the timing noise: {', '.join(tied)})" if tied else "")
        )
    if busy:
        worst = max(ours, key=lambda row: row.times[("busy", 2)] / row.times[("idle", 2)])
        dense = [row for row in rows if row.group == "MKL dense"]
        lines.append(
            f"  busy/idle at 2 threads: worst of ours {worst.name.strip()} "
            f"{_ratio(worst.times[('busy', 2)], worst.times[('idle', 2)])} (target <= 2x); MKL dense, the yardstick: "
            + ", ".join(f"{row.name.strip()} {_ratio(row.times[('busy', 2)], row.times[('idle', 2)])}" for row in dense)
        )
        cores = usable_cores()
        lines.append(
            f"  fair share alone (fair_share_floor): a 2-thread call that keeps both threads working when idle takes "
            f"{fair_share_floor(contention, 2, cores):.1f}x its idle time beside {contention} busy on {cores} cores"
        )
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_qlora.bench kernels", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--contention", type=int, default=0, help=f"busy processes beside the second pass (0..{MAX_BUSY})"
    )
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per row and setting (median)")
    args = parser.parse_args(argv)
    if not 0 <= args.contention <= MAX_BUSY:
        raise ConfigError(f"--contention {args.contention} must be from 0 to {MAX_BUSY} (busy processes).")
    if args.size < 64 or args.size % 64:
        raise ConfigError(f"--size {args.size} must be a positive multiple of 64 (whole absmax blocks per row).")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} must be at least 1.")
    return args


def main(argv: list[str]) -> None:
    """Print the tables (see the module docstring); ``argv`` are the options after ``kernels``."""
    args = parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from lightning_qlora import _openmp
    from lightning_qlora.ops import backend

    rows = build_rows(args.size)
    cross = crossover(min(args.size, 4096), max(3, args.repeats))
    if args.contention:
        with busy_processes(args.contention) as busy:
            time_rows(rows, args.repeats, busy)
    else:
        time_rows(rows, args.repeats)
    print(
        f"backend: {backend()}; {args.size}x{args.size} fp32 weight, NF4+DQ block 64; median ms of about "
        f"{args.repeats} calls per setting in {ROUNDS} interleaved rounds; OpenMP wait policy: {_openmp.wait_policy()}"
    )
    print("\n".join(report(rows, args.contention)))
    print("\nfused GEMV vs dequantize + F.linear, 2 threads, idle (ms):")
    print("  " + "  ".join(f"batch {b}: {f:.2f} / {s:.2f}" for b, f, s in cross))
