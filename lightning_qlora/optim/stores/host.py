"""``HostPageStore``: optimizer state in host RAM (pinned when the update runs on a GPU).

* Compute device CPU: the pages *are* the state -- :meth:`fetch` returns views, nothing is
  copied. This is the unpaged baseline of the paged code path (a budget makes no sense here;
  use :class:`~lightning_qlora.optim.stores.MmapPageStore` to bound resident memory).
* Compute device CUDA (GPU offload): the regions are pinned host memory; a page is copied to
  the GPU on a side stream when prefetched, updated there, and copied back on release. The
  GPU holds at most ``budget_bytes`` of pages (least recently used first out).
  **The CUDA path has not run here: the build machines have no GPU.**
"""

from __future__ import annotations

import torch
from typing_extensions import override

from lightning_qlora.optim.errors import PagedOptimizerError, PageStoreSetupError
from lightning_qlora.optim.stores.base import Extent, PageStore, format_bytes


class HostPageStore(PageStore):
    """Pages in host memory; see the module docstring.

    Args:
        device: the compute device the optimizer updates on (``"cpu"`` or a CUDA device).
        budget_bytes: most bytes of pages on the GPU at once (CUDA only; ``None``: no limit).

    Example:
        >>> store = HostPageStore("cpu")
        >>> [extent] = store.allocate([1024])
        >>> store.fetch(extent).shape
        torch.Size([1024])
    """

    def __init__(self, device: torch.device | str = "cpu", budget_bytes: int | None = None) -> None:
        super().__init__(budget_bytes)
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        if self._device.type not in ("cpu", "cuda"):
            raise PagedOptimizerError(f"HostPageStore serves CPU or CUDA updates, got device {self._device}.")
        if self._device.type == "cpu" and budget_bytes is not None:
            raise PagedOptimizerError(
                f"HostPageStore on CPU keeps the whole state in RAM, so budget_bytes={budget_bytes} cannot be "
                "honoured; use MmapPageStore(directory, budget_bytes=...) to bound resident memory on CPU."
            )
        self._regions: list[torch.Tensor] = []
        self._on_device: dict[tuple[int, int], torch.Tensor] = {}
        self._ready: dict[tuple[int, int], torch.cuda.Event] = {}
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None

    @property
    @override
    def device(self) -> torch.device:
        return self._device

    @override
    def _reserve(self, nbytes: int) -> int:
        pin = self._device.type == "cuda"
        try:
            region = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        except RuntimeError as error:  # out of (pinned) host memory
            raise PageStoreSetupError(
                f"cannot allocate {format_bytes(nbytes)} of {'pinned ' if pin else ''}host memory for optimizer "
                f"pages: {error}. Use MmapPageStore to keep the state on disk instead."
            ) from error
        self._regions.append(region)
        return len(self._regions) - 1

    def _host(self, extent: Extent) -> torch.Tensor:
        return self._regions[extent.region][extent.offset : extent.offset + extent.nbytes]

    @override
    def _start_prefetch(self, extent: Extent) -> None:
        if self._stream is None:
            return
        key = (extent.region, extent.offset)
        # the side stream must not read the host bytes before earlier write-backs landed
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            self._on_device[key] = self._host(extent).to(self._device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._ready[key] = event

    @override
    def _view(self, extent: Extent) -> torch.Tensor:
        if self._stream is None:
            return self._host(extent)
        key = (extent.region, extent.offset)
        if key not in self._on_device:
            self._start_prefetch(extent)
        event = self._ready.pop(key, None)
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)
            # the copy was made on the side stream; tell the caching allocator it is used here too
            self._on_device[key].record_stream(torch.cuda.current_stream(self._device))
        return self._on_device[key]

    @override
    def _write_back(self, extent: Extent, view: torch.Tensor) -> None:
        if self._stream is not None:
            self._host(extent).copy_(view, non_blocking=True)

    @override
    def _drop(self, extent: Extent) -> None:
        key = (extent.region, extent.offset)
        self._on_device.pop(key, None)
        self._ready.pop(key, None)

    @override
    def synchronize(self) -> None:
        if self._stream is not None:
            torch.cuda.synchronize(self._device)
