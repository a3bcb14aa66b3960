"""Keep a CPU process's resident memory close to what its live tensors use.

On Linux with glibc, memory of a freed tensor is not always given back to the system. glibc
serves a request from ``mmap`` (returned on free) only above its *mmap threshold*, and it raises
that threshold, up to 32 MiB, each time a block it had mapped is freed. After the first few
freed activations of a training step, every tensor below 32 MiB comes from the heap instead,
and freed heap blocks stay resident while any live block sits above them. A training loop
allocates and frees thousands of such tensors per step, so the resident size creeps up step
after step although the live tensors do not grow: in ``benchmarks/big_model.py`` (a Llama-2-7B
shape, LoRA r=16) this retention was ~2 GiB of the peak.

:func:`limit_allocator_retention` fixes the threshold (glibc then stops adjusting it), so
tensors above it are mapped and returned on free. It is the same as starting the process with
``MALLOC_MMAP_THRESHOLD_=<bytes>`` in the environment, but can be called from inside a program.
It changes the whole process's allocator, so the library never calls it on its own: call it
once at start-up when resident memory is the constraint (a large model on a small machine).
Each fresh mapping costs page faults on first touch, a small price next to a training step.

:func:`reuse_freed_memory` is the opposite trade, for speed: freed blocks up to 32 MiB stay in the
process for the next tensor of their size, and the heap is never trimmed. A training step, an
evaluation batch or a generation step allocates the same tensors again and again; with glibc's
defaults many of them arrive as fresh pages, each faulting on first touch -- on this 2-core VM
1-2 million faults (3.5-5.5 s of system time) in one 150-example answer-loss pass, which took
9.8-13 s against 6.3-7.4 s with this call. The resident size stays near its peak instead of
falling between steps; the peak itself does not grow. The app (``lightning-qlora``) calls it at
start-up (``host_memory: reuse`` in ``conf/train.yaml``); call it yourself at the start of your own
CPU training script, or :func:`limit_allocator_retention` where resident memory is the constraint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from lightning_qlora.errors import ConfigError

#: glibc's ``mallopt`` parameter numbers (malloc.h): the mmap threshold and the heap trim threshold.
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: A trim threshold no heap reaches (``mallopt`` takes an ``int``): freed heap memory is never returned.
_NEVER_TRIM = 2**31 - 1
#: The largest threshold glibc accepts on 64-bit systems (``HEAP_MAX_SIZE / 2``).
MAX_THRESHOLD_BYTES = 32 << 20


def limit_allocator_retention(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of at least ``threshold_bytes`` from ``mmap`` so that freeing it returns it.

    Args:
        threshold_bytes: allocations of this size or larger are mapped and unmapped on free
            (default 1 MiB; smaller ones keep glibc's fast heap). At most 32 MiB.

    Returns:
        ``True`` when the setting took effect; ``False`` where the C library is not glibc
        (macOS, Windows, musl), which do not have this behaviour to fix.

    Raises:
        ConfigError: ``threshold_bytes`` is not an integer in ``[1, 32 MiB]``.
    """
    if (
        isinstance(threshold_bytes, bool)
        or not isinstance(threshold_bytes, int)
        or not (1 <= threshold_bytes <= MAX_THRESHOLD_BYTES)
    ):
        raise ConfigError(
            f"threshold_bytes={threshold_bytes!r} must be an integer in [1, {MAX_THRESHOLD_BYTES}] "
            "(glibc's largest mmap threshold is 32 MiB); the default 1 MiB suits training loops."
        )
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def reuse_freed_memory() -> bool:
    """Keep freed memory for reuse: blocks up to 32 MiB come from the heap, which is never trimmed.

    Fewer page faults per training or evaluation step (see the module docs); resident memory stays
    near its peak. Same as starting the process with ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2147483647``.

    Returns:
        ``True`` when the setting took effect; ``False`` where the C library is not glibc.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # Both, in this order: fixing either threshold stops glibc's adjustment of the other, and a fixed
    # trim threshold alone leaves the mmap threshold at its 128 KiB start (every tensor mapped).
    return bool(mallopt(_M_MMAP_THRESHOLD, MAX_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def _mallopt() -> Any:
    """glibc's ``mallopt``, or ``None`` off Linux or with another C library (musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
