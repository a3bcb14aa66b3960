"""Page stores: where paged optimizer state lives between updates.

* :class:`HostPageStore` -- host RAM (pinned and staged to the GPU on CUDA); the unpaged baseline on CPU.
* :class:`MmapPageStore` -- a memory-mapped file with an LRU resident budget (CPU / RAM-limited runs).
* :class:`CudaManagedPageStore` -- CUDA unified memory with prefetch (QLoRA's paged optimizers; needs a GPU).

:func:`make_page_store` builds one by name (``"host"``, ``"mmap"``, ``"cuda"``, ``"auto"``).
"""

from __future__ import annotations

import os

import torch

from lightning_qlora.optim.errors import PagedOptimizerError
from lightning_qlora.optim.stores.base import Extent, PageStore, format_bytes, round_up
from lightning_qlora.optim.stores.cuda_managed import CudaManagedPageStore
from lightning_qlora.optim.stores.host import HostPageStore
from lightning_qlora.optim.stores.mmap import MmapPageStore

#: Names accepted by :func:`make_page_store`.
STORE_NAMES: tuple[str, ...] = ("auto", "host", "mmap", "cuda")


def make_page_store(
    name: str,
    device: torch.device | str = "cpu",
    budget_bytes: int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> PageStore:
    """Build a page store by name for updates on ``device``.

    ``"auto"`` picks CUDA managed memory for a CUDA device, otherwise the file store if a
    budget or a directory is given, otherwise host memory.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            name = "cuda"
        else:
            name = "mmap" if budget_bytes is not None or directory is not None else "host"
    if name == "host":
        return HostPageStore(device, budget_bytes)
    if name == "mmap":
        if device.type != "cpu":
            raise PagedOptimizerError(
                f"MmapPageStore serves CPU updates, got device {device}; on CUDA use store='cuda' or 'host'."
            )
        return MmapPageStore(directory, budget_bytes)
    if name == "cuda":
        return CudaManagedPageStore(device, budget_bytes)
    raise PagedOptimizerError(f"unknown page store {name!r}; choose one of {', '.join(STORE_NAMES)}.")


__all__ = [
    "STORE_NAMES",
    "CudaManagedPageStore",
    "Extent",
    "HostPageStore",
    "MmapPageStore",
    "PageStore",
    "format_bytes",
    "make_page_store",
    "round_up",
]
