"""Make idle OpenMP threads spin briefly, then sleep -- set before torch loads OpenMP.

torch's CPU ops (and MKL) use one GNU OpenMP team; our kernels use their own pool of sleeping
helpers (``csrc/cpu/parallel.h``). What an idle OpenMP thread does between two parallel ops is a
trade between an idle machine and a busy one:

* GNU OpenMP's default spins for milliseconds (300000 spins) after every op. On a machine with
  other busy processes -- DataLoader workers, tokenizers, other users -- the spinning thread takes
  the core a working thread needs, and every parallel region waits for its slowest thread:
  greedy generation of 50 prompts (the main job's evaluation batch) beside two busy processes
  took 17.6 s at 2 threads against 6.8 s at 1 thread (issue 18).
* ``OMP_WAIT_POLICY=PASSIVE`` (no spinning: what this module set until issue 20) degrades
  gracefully (6.0 s there), but then every parallel op wakes a sleeping thread, ~40 us on this
  VM: a 50x576x16 matmul (a LoRA factor) took 111 us instead of 11 us, a main-job training step
  2.1-2.5 s instead of 1.35-1.65 s, and the same generation 4.5 s instead of 3.5 s when idle.
* :data:`SPIN_COUNT` spins (``GOMP_SPINCOUNT=2000``: ~40-80 us here, measured with a 2-thread
  region after a pause: up to 40 us it costs ~1 us, from 80 us on ~25-35 us) keep a thread awake
  across the short gaps between the ops of one forward and backward pass, and put it to sleep soon
  after: the idle speed of spinning (training step 1.35-1.65 s, generation 3.55 s) and 8.1 s beside
  two busy processes instead of 17.6 s.

OpenMP reads the setting once, when it is loaded, so it is set here, on ``import lightning_qlora``,
and only if torch is not loaded yet and the user chose nothing (an explicit ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` always wins: ``export OMP_WAIT_POLICY=PASSIVE`` on a machine that is always
busy). :func:`wait_policy` tells which setting is in effect.
"""

from __future__ import annotations

import os
import sys

#: Spins of an idle GNU OpenMP thread before it sleeps (see the module docs for the measurements).
SPIN_COUNT = 2000

#: Whether this module chose the setting (torch was not loaded yet and nothing was set).
SET_BY_US = (
    "torch" not in sys.modules and not os.environ.get("OMP_WAIT_POLICY") and not os.environ.get("GOMP_SPINCOUNT")
)
if SET_BY_US:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
#: True if OpenMP was loaded (with torch) before we could choose; then the default spinning applies.
LOADED_TOO_EARLY = not SET_BY_US and not os.environ.get("OMP_WAIT_POLICY") and not os.environ.get("GOMP_SPINCOUNT")


def wait_policy() -> str:
    """``"GOMP_SPINCOUNT=2000 (set by lightning_qlora)"``, the user's own setting, or ``"default (spinning)"``."""
    if SET_BY_US:
        return f"GOMP_SPINCOUNT={SPIN_COUNT} (set by lightning_qlora)"
    if LOADED_TOO_EARLY:
        return (
            f"default (spinning for milliseconds; import lightning_qlora before torch, or export "
            f"GOMP_SPINCOUNT={SPIN_COUNT})"
        )
    return f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!s} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '')!s}"
