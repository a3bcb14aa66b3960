"""``CudaManagedPageStore``: optimizer state in CUDA unified (managed) memory, as QLoRA's paged optimizers.

Regions come from ``cudaMallocManaged`` with the host as preferred location; the driver
migrates pages on demand, so state larger than free GPU memory does not stop training.
:meth:`prefetch` migrates the next page to the GPU on a side stream while the current one is
updated (``cudaMemPrefetchAsync``), and pages evicted past ``budget_bytes`` are prefetched
back to the host. The CUDA side is ``csrc/cuda/paged_memory.cu`` (raw pointers, no torch
headers), built on first use with ``nvcc`` into a shared library loaded through ``ctypes``.

**Not run here**: the build machines have no GPU, so this store is compile-checked
(``nvcc`` for sm_80/sm_90) but untested. Choosing it without CUDA raises
:class:`~lightning_qlora.optim.errors.PageStoreUnavailableError`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from lightning_qlora.optim.errors import PageStoreSetupError, PageStoreUnavailableError
from lightning_qlora.optim.stores.base import Extent, PageStore, format_bytes

SOURCE = Path(__file__).resolve().parents[3] / "csrc" / "cuda" / "paged_memory.cu"
_HOST = -1  # the .cu's device ordinal for "the host"


@functools.cache
def managed_memory_library() -> ctypes.CDLL:
    """Build (once, cached next to the torch extensions) and load ``paged_memory.cu``."""
    if not torch.cuda.is_available():
        raise PageStoreUnavailableError(
            "CudaManagedPageStore needs a CUDA device and a CUDA build of torch; none is available. "
            "On CPU use MmapPageStore (disk pages with a resident budget) or HostPageStore."
        )
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not SOURCE.is_file() or not Path(nvcc).exists():
        raise PageStoreUnavailableError(
            f"CudaManagedPageStore needs {SOURCE} and nvcc (looked for {nvcc!r}; set $NVCC) to build its library."
        )
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    library = cache / "lightning_qlora_paged_memory" / f"libpaged_memory_{int(SOURCE.stat().st_mtime)}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        major, minor = torch.cuda.get_device_capability()
        command = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC",
                   f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}", str(SOURCE), "-o", str(library)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PageStoreUnavailableError(f"building {SOURCE.name} failed:\n{result.stderr[-2000:]}")
    lib = ctypes.CDLL(str(library))
    lib.lq_managed_alloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_int]
    lib.lq_managed_free.argtypes = [ctypes.c_void_p]
    lib.lq_prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.lq_mem_info.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    lib.lq_error_string.restype = ctypes.c_char_p
    return lib


class _ManagedBuffer:
    """A managed allocation seen by torch through ``__cuda_array_interface__`` (zero-copy)."""

    def __init__(self, pointer: int, nbytes: int) -> None:
        self.pointer, self.nbytes = pointer, nbytes

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.pointer, False), "version": 3}


class CudaManagedPageStore(PageStore):
    """Pages in CUDA managed memory (see the module docstring; untested here, no GPU).

    Args:
        device: the CUDA device the update runs on.
        budget_bytes: most bytes of pages kept on the GPU at once (``None``: the driver decides).
    """

    def __init__(self, device: torch.device | str = "cuda", budget_bytes: int | None = None) -> None:
        super().__init__(budget_bytes)
        self._lib = managed_memory_library()
        self._device = torch.device(device)
        if self._device.type != "cuda":
            raise PageStoreUnavailableError(f"CudaManagedPageStore updates on a CUDA device, got {self._device}.")
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        self._buffers: list[_ManagedBuffer] = []
        self._tensors: list[torch.Tensor] = []
        self._ready: dict[tuple[int, int], torch.cuda.Event] = {}

    @property
    @override
    def device(self) -> torch.device:
        return self._device

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self._lib.lq_error_string(status).decode()
            raise PageStoreSetupError(f"{what} failed: CUDA error {status} ({message}).")

    @override
    def _reserve(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        status = self._lib.lq_managed_alloc(ctypes.byref(pointer), nbytes, self._device.index)
        self._check(status, f"cudaMallocManaged of {format_bytes(nbytes)} for optimizer pages")
        buffer = _ManagedBuffer(int(pointer.value or 0), nbytes)
        self._buffers.append(buffer)
        self._tensors.append(torch.as_tensor(buffer, device=self._device))
        return len(self._buffers) - 1

    def _pointer(self, extent: Extent) -> int:
        return self._buffers[extent.region].pointer + extent.offset

    @override
    def _start_prefetch(self, extent: Extent) -> None:
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        status = self._lib.lq_prefetch(self._pointer(extent), self._span(extent), self._device.index,
                                       self._stream.cuda_stream)  # fmt: skip
        self._check(status, "cudaMemPrefetchAsync to the GPU")
        event = torch.cuda.Event()
        event.record(self._stream)
        self._ready[(extent.region, extent.offset)] = event

    @override
    def _view(self, extent: Extent) -> torch.Tensor:
        key = (extent.region, extent.offset)
        if key not in self._ready:
            self._start_prefetch(extent)
        torch.cuda.current_stream(self._device).wait_event(self._ready.pop(key))
        return self._tensors[extent.region][extent.offset : extent.offset + extent.nbytes]

    @override
    def _drop(self, extent: Extent) -> None:
        self._ready.pop((extent.region, extent.offset), None)
        stream = torch.cuda.current_stream(self._device).cuda_stream
        self._check(self._lib.lq_prefetch(self._pointer(extent), self._span(extent), _HOST, stream),
                    "cudaMemPrefetchAsync back to the host")  # fmt: skip

    @override
    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def __del__(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        self._tensors.clear()
        for buffer in getattr(self, "_buffers", []):
            lib.lq_managed_free(buffer.pointer)
