"""Make OpenMP threads sleep, not spin, while they wait for work -- before torch loads OpenMP.

torch's CPU ops (and MKL) use one GNU OpenMP team; our kernels use their own pool of sleeping
helpers (``csrc/cpu/parallel.h``). By default an idle OpenMP thread spins for milliseconds after
every parallel op, taking the core our helpers (or anyone else) need next. On
a machine with other busy processes -- DataLoader workers, tokenizers, a second DDP rank, other
users -- a spinning thread takes the core a working thread needs, and every parallel region
waits for its slowest thread: measured here beside two busy processes, a model-like mix of
small matmuls ran 10x slower at 2 threads than at 1 (issue 18); with ``OMP_WAIT_POLICY=PASSIVE``
2 threads beat 1 again. OpenMP reads the policy once, when it is loaded, so it is set here, on
``import lightning_qlora``, and only if torch is not loaded yet and the user chose no policy
(an explicit ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` always wins). :func:`wait_policy` tells
which policy is in effect.
"""

from __future__ import annotations

import os
import sys

#: Whether this module chose the policy (torch was not loaded yet and nothing was set).
SET_BY_US = (
    "torch" not in sys.modules and not os.environ.get("OMP_WAIT_POLICY") and not os.environ.get("GOMP_SPINCOUNT")
)
if SET_BY_US:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
#: True if OpenMP was loaded (with torch) before we could choose; then the default spinning applies.
LOADED_TOO_EARLY = not SET_BY_US and not os.environ.get("OMP_WAIT_POLICY") and not os.environ.get("GOMP_SPINCOUNT")


def wait_policy() -> str:
    """``"PASSIVE (set by lightning_qlora)"``, the user's own setting, or ``"default (spinning)"``."""
    if SET_BY_US:
        return "PASSIVE (set by lightning_qlora)"
    if LOADED_TOO_EARLY:
        return "default (spinning; import lightning_qlora before torch, or export OMP_WAIT_POLICY=PASSIVE)"
    return f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!s} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '')!s}"
