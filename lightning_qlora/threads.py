"""torch's thread count per training step, chosen by measurement: the user's count or one thread.

A training step runs thousands of parallel torch ops (the main job's: ~3,100 matmuls alone), and a
team of OpenMP threads meets at the end of each. Beside busy processes -- DataLoader workers,
tokenizers, a second run -- the scheduler deschedules one of the team now and then, and every op
after it waits. Measured on the 2-core VM this was built on (the main job's model, NF4+DQ + LoRA,
batch 8, fp32; 12 steps per setting, interleaved; beside two busy processes), median seconds per
step:

================================  ==========  ==========  ==========================
OpenMP setting                    2 threads   1 thread    2 threads, beside 2 busy
================================  ==========  ==========  ==========================
``GOMP_SPINCOUNT=2000`` (ours)    2.00 idle   2.74 idle   4.77 (1 thread: 3.79)
default spinning (torch first)    2.05 idle   2.59 idle   13.32 (1 thread: 3.91)
================================  ==========  ==========  ==========================

Two threads win on an idle machine, one thread beside busy processes -- 3.4x with OpenMP's default
spinning, which every script that imports ``torch`` before ``lightning_qlora`` gets. Neither count
is right everywhere, and contention comes and goes, so :class:`StepThreads` times every step and
follows the measurements, both ways: the same policy as the C++ kernels' per-call choice
(``csrc/cpu/parallel.h``), at the granularity of a whole step. ``NF4Precision(adaptive_threads=True)``
runs each optimizer step (forward, backward and update) through it; with ``torch.use_deterministic_algorithms``
it never changes the count. Off by default: a step run on another thread count can round
differently (a parallel reduction splits its sum differently), so a resumed run is bit-equal to an
uninterrupted one only at a fixed count.

Example:
    >>> chooser = StepThreads(threads=2)
    >>> with chooser.step() as threads:  # torch.get_num_threads() == threads inside, restored after
    ...     pass
    >>> threads in (1, 2)
    True
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

from lightning_qlora.errors import ConfigError

ONE, TEAM = 0, 1


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container or ``taskset`` may allow fewer than
    ``os.cpu_count()``), the CPU count where the platform has no affinity."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class StepThreads:
    """Chooses, per step, between ``threads`` torch threads (a team) and one, by the steps' measured times.

    Policy: each choice keeps its :attr:`samples` newest step times. At the start, and whenever the
    machine changed, both are measured :attr:`warmup` times (alternating); then the cheaper one runs
    -- the team only if at most :attr:`margin` of one thread's cost -- and the other is probed every
    :attr:`first_interval` steps, the interval doubling up to :attr:`max_interval` while the probe
    keeps losing. A choice's cost is the mean of its fresh records (this measurement round, at most
    :attr:`stale` steps old) without the slowest one: a step that was preempted, or paid a one-off
    cost (the first step builds caches), must not decide. The machine changed means: the running
    choice's two newest steps are both :attr:`shift` away from the cost it was chosen at.

    Args:
        threads: the team's size; ``None``: ``torch.get_num_threads()`` when the first step starts.
            With one thread there is nothing to choose and every step runs on one.
    """

    samples = 5
    warmup = 2
    first_interval = 4
    max_interval = 32
    stale = 48
    margin = 0.95
    shift = 0.3

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads={threads!r}: give a positive int (the team's size), or None for torch's count.")
        self.threads = threads
        self.history: list[int] = []  # the thread count of every step so far
        self._records: tuple[list[tuple[int, float]], list[tuple[int, float]]] = ([], [])  # (step, seconds)
        self._step = 0
        self._epoch = 0  # records made before this step are from another machine (see _forget)
        self._current = TEAM
        self._measuring = True
        self._probing = False
        self._next_probe = 0
        self._interval = self.first_interval
        self._settled = -1.0

    # -- policy -----------------------------------------------------------------------------

    def _fresh(self, choice: int) -> list[float]:
        return [s for at, s in self._records[choice] if at >= self._epoch and self._step - at <= self.stale]

    def cost(self, choice: int) -> float:
        """Seconds per step of ``choice`` (0: one thread, 1: the team) by its fresh records; -1 with none at all."""
        fresh = self._fresh(choice)
        if not fresh:
            return self._records[choice][-1][1] if self._records[choice] else -1.0
        if len(fresh) == 1:
            return fresh[0]
        return (sum(fresh) - max(fresh)) / (len(fresh) - 1)

    def _best(self) -> int:
        return TEAM if self.cost(TEAM) < self.margin * self.cost(ONE) else ONE

    def _forget(self) -> None:
        self._epoch = self._step
        self._interval = self.first_interval
        self._measuring = True

    def pick(self) -> int:
        """The thread count for the next step (1 or the team's size); call :meth:`record` after it."""
        team = self.threads if self.threads is not None else torch.get_num_threads()
        self._step += 1
        self._probing = False
        if team <= 1 or torch.are_deterministic_algorithms_enabled():
            return team
        if self._measuring:  # alternate, the choice with fewer records this round first
            counts = [len(self._fresh(ONE)), len(self._fresh(TEAM))]
            choice = self._current if counts[ONE] == counts[TEAM] else (TEAM if counts[TEAM] < counts[ONE] else ONE)
            return team if choice == TEAM else 1
        if self._step >= self._next_probe:
            self._probing = True
            self._next_probe = self._step + self._interval
            return 1 if self._current == TEAM else team
        return team if self._current == TEAM else 1

    def record(self, threads: int, seconds: float) -> None:
        """The measured ``seconds`` of the step :meth:`pick` ran on ``threads``."""
        choice = ONE if threads <= 1 else TEAM
        records = self._records[choice]
        records.append((self._step, seconds))
        del records[: -self.samples]
        if self._measuring:
            if min(len(self._fresh(ONE)), len(self._fresh(TEAM))) < self.warmup:
                return
            self._measuring = False
            self._current = self._best()
            self._settled = self.cost(self._current)
            self._next_probe = self._step + self._interval
            return
        if self._probing:
            winner = self._best()
            self._interval = self.first_interval if winner == choice else min(2 * self._interval, self.max_interval)
            self._current = winner
            self._settled = self.cost(winner)
            return
        self._current = self._best()
        newest = [s for at, s in records[-2:] if at >= self._epoch]
        if (
            self._current == choice
            and len(newest) == 2
            and all(abs(s - self._settled) > self.shift * self._settled for s in newest)
        ):
            self._forget()

    # -- use --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self) -> Iterator[int]:
        """Run the block (one training step) on the chosen thread count, time it, restore the previous count.

        A step that raises is not recorded (its time says nothing about the thread count).
        """
        threads = self.pick()
        previous = torch.get_num_threads()
        if threads != previous:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield threads
        finally:
            seconds = time.perf_counter() - start
            if threads != previous:
                torch.set_num_threads(previous)
        self.history.append(threads)
        self.record(threads, seconds)
