"""``CudaManagedPageStore``: optimizer state in CUDA unified (managed) memory, as QLoRA's paged optimizers.

Regions come from ``cudaMallocManaged`` with the host as preferred location; the driver
migrates pages on demand, so state larger than free GPU memory does not stop training.
:meth:`prefetch` migrates the next page to the GPU on a side stream while the current one is
updated (``cudaMemPrefetchAsync``), and pages evicted past ``budget_bytes`` are prefetched
back to the host. The CUDA side is ``csrc/cuda/paged_memory.cu``, part of the same compiled
extension as the CUDA kernels (``lightning_qlora.ops._build`` builds it on first use; its
bindings are in ``csrc/cuda/bindings.cpp``).

**Not run here**: the build machines have no GPU, so this store is compile-checked
(``make cuda-check``) but untested. Choosing it without CUDA raises
:class:`~lightning_qlora.optim.errors.PageStoreUnavailableError`.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from lightning_qlora.optim.errors import PageStoreSetupError, PageStoreUnavailableError
from lightning_qlora.optim.stores.base import Extent, PageStore, format_bytes


def managed_memory_ops() -> Any:
    """The compiled CUDA extension, whose ``managed_*`` functions this store calls (built on first use)."""
    if not torch.cuda.is_available():
        raise PageStoreUnavailableError(
            "CudaManagedPageStore needs a CUDA device and a CUDA build of torch; none is available. "
            "On CPU use MmapPageStore (disk pages with a resident budget) or HostPageStore."
        )
    from lightning_qlora.ops._build import build_error
    from lightning_qlora.ops._cuda_extension import cuda_extension

    extension = cuda_extension()
    if extension is None:
        raise PageStoreUnavailableError(
            "CudaManagedPageStore needs the compiled CUDA extension (csrc/cuda, built with nvcc on first use), and "
            f"it is not available: {build_error(cuda_extension.name) or 'the build did not run'}. "
            "Install nvcc matching torch's CUDA version (or set $CUDA_HOME), or use HostPageStore."
        )
    return extension


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
        self._ops = managed_memory_ops()
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

    @staticmethod
    def _call(what: str, function: Any, *args: int) -> Any:
        try:
            return function(*args)
        except RuntimeError as error:  # the binding's TORCH_CHECK carries CUDA's own message
            raise PageStoreSetupError(f"{what} failed: {error}") from error

    @override
    def _reserve(self, nbytes: int) -> int:
        pointer = self._call(
            f"cudaMallocManaged of {format_bytes(nbytes)} for optimizer pages",
            self._ops.managed_alloc,
            nbytes,
            self._device.index,
        )
        buffer = _ManagedBuffer(int(pointer), nbytes)
        self._buffers.append(buffer)
        self._tensors.append(torch.as_tensor(buffer, device=self._device))
        return len(self._buffers) - 1

    def _pointer(self, extent: Extent) -> int:
        return self._buffers[extent.region].pointer + extent.offset

    @override
    def _start_prefetch(self, extent: Extent) -> None:
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        self._call(
            "cudaMemPrefetchAsync to the GPU",
            self._ops.managed_prefetch,
            self._pointer(extent),
            self._span(extent),
            self._device.index,
            self._stream.cuda_stream,
        )
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
        self._call(
            "cudaMemPrefetchAsync back to the host",
            self._ops.managed_prefetch,
            self._pointer(extent),
            self._span(extent),
            self._ops.HOST_DEVICE,
            stream,
        )

    @override
    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def __del__(self) -> None:
        ops = getattr(self, "_ops", None)
        if ops is None:
            return
        self._tensors.clear()
        for buffer in getattr(self, "_buffers", []):
            try:
                ops.managed_free(buffer.pointer)
            except RuntimeError:  # at interpreter exit the CUDA context may be gone already
                pass
