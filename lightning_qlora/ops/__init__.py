"""Custom ops: schemas declared once, reference kernels for every device.

Import this package to make ``torch.ops.lightning_qlora.<op>`` available. The compiled
C++/CUDA kernels (``csrc/``) register for their own devices on top of the reference
kernels; without them everything still works on the reference path.
"""

from __future__ import annotations

import torch

from lightning_qlora.ops import _build, _cuda_extension, _extension, reference, schemas  # noqa: F401 -- they register the kernels
from lightning_qlora.ops.schemas import NAMESPACE, num_blocks, qualified_name

#: Names of every op we declare.
OP_NAMES: tuple[str, ...] = tuple(reference.REFERENCE_KERNELS)


def op(name: str) -> torch._ops.OpOverload:
    """The default overload of ``lightning_qlora::<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def build_cpu_extension() -> tuple[bool, float, str | None]:
    """Build (or load from the cache) the C++ CPU kernels now: ``(ok, seconds, error)``."""
    return _build.build_result("lightning_qlora_cpu")


def build_cuda_extension() -> tuple[bool, float, str | None]:
    """Build (or load from the cache) the CUDA kernels now: ``(ok, seconds, error)``; needs CUDA and nvcc."""
    if not torch.cuda.is_available():
        return False, 0.0, "torch.cuda.is_available() is False"
    return _build.build_result("lightning_qlora_cuda")


def set_kernel_threads(threads: int) -> bool:
    """Threads our compiled CPU kernels may use whatever ``torch.get_num_threads()`` says (0: follow torch).

    Each kernel still chooses by measurement between one thread and that many (csrc/cpu/parallel.h).
    The serving engine keeps torch on fewer threads (its small per-layer ops) and lets the large
    products -- the 49152-row ``lm_head`` -- take a second core when it pays. Returns ``False``
    (nothing to set) when the compiled kernels are not loaded.

    Raises:
        ValueError: ``threads`` is negative or not an integer.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads={threads!r} must be an integer >= 0 (0: follow torch.get_num_threads()).")
    extension = _extension.cpu_extension()
    if extension is None:
        return False
    extension.set_kernel_threads(threads)
    return True


from lightning_qlora.ops._extension import backend

__all__ = [
    "NAMESPACE",
    "OP_NAMES",
    "backend",
    "build_cpu_extension",
    "build_cuda_extension",
    "num_blocks",
    "op",
    "set_kernel_threads",
    "qualified_name",
    "reference",
    "schemas",
]
