"""``MmapPageStore``: optimizer state in a memory-mapped file, at most ``budget_bytes`` resident.

Each :meth:`~PageStore.allocate` creates one file in ``directory``, reserves its full size on
disk with ``posix_fallocate`` (so an unwritable directory or a full disk fails right there,
at optimizer construction, and never as a ``SIGBUS`` mid-step) and maps it shared. The file is
unlinked at once: it disappears with the process, even one that crashes.

Updates run directly on the mapping (no copies). A fetched page becomes resident as it is
touched; pages past the budget are evicted least recently used first with
``madvise(MADV_DONTNEED)``, which unmaps them from the process -- for a shared file mapping the
data stays in the file (the kernel writes dirty pages back), so nothing is lost. Prefetch is
``madvise(MADV_WILLNEED)``: the kernel reads the next page ahead while this one is updated.

Pages are aligned to 64 KiB so the kernel's fault-around (which maps up to 64 KiB of page
cache around a faulting address) never maps bytes of a page we do not count as resident, and
the mapping is ``MADV_NOHUGEPAGE`` + ``MADV_RANDOM`` so the page cache keeps small folios (a write
fault maps a whole large folio, up to 2 MiB, at once; the test suite caught this): the
process's resident set for the file (``Rss`` of the mapping in ``/proc/self/smaps``) stays
within :attr:`PageStore.resident_bytes` ``<= budget_bytes``. The OS page cache may still hold
clean or dirty copies of the file; that memory belongs to the kernel, which reclaims it
under pressure (writing dirty pages to disk), which is the point of a file store.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import torch
from typing_extensions import override

from lightning_qlora.optim.errors import PageStoreSetupError
from lightning_qlora.optim.stores.base import Extent, PageStore, format_bytes

#: Prefix of the page files (unlinked on creation; visible as ``(deleted)`` in /proc/<pid>/maps).
PAGE_FILE_PREFIX = "lightning-qlora-pages-"


class MmapPageStore(PageStore):
    """Pages in a memory-mapped file with an LRU resident budget (see the module docstring).

    Args:
        directory: where page files go (created if missing); default the system temp directory.
        budget_bytes: most bytes of pages mapped at once (``None``: no limit, the kernel decides).

    Example:
        >>> store = MmapPageStore(budget_bytes=1 << 20)
        >>> [extent] = store.allocate([3 * 65536])
        >>> store.fetch(extent.sub(0, 65536)).fill_(1).sum().item()
        65536
    """

    alignment = 64 * 1024

    def __init__(self, directory: str | os.PathLike[str] | None = None, budget_bytes: int | None = None) -> None:
        super().__init__(budget_bytes)
        self.directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PageStoreSetupError(
                f"cannot create the page directory {str(self.directory)!r}: {error.strerror or error}. "
                "Choose a writable page_dir on a disk with room for the optimizer state."
            ) from error
        self._maps: list[mmap.mmap] = []
        self._tensors: list[torch.Tensor] = []

    @property
    @override
    def device(self) -> torch.device:
        return torch.device("cpu")

    @override
    def _reserve(self, nbytes: int) -> int:
        try:
            fd, path = tempfile.mkstemp(prefix=PAGE_FILE_PREFIX, suffix=".bin", dir=self.directory)
        except OSError as error:
            raise PageStoreSetupError(
                f"cannot create a page file in {str(self.directory)!r}: {error.strerror or error}. "
                "Choose a writable page_dir."
            ) from error
        try:
            os.unlink(path)
            # reserve every block now: ENOSPC (or a quota) surfaces here, not as SIGBUS mid-step
            os.posix_fallocate(fd, 0, nbytes)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            raise PageStoreSetupError(
                f"cannot reserve {format_bytes(nbytes)} for optimizer pages in {str(self.directory)!r}: "
                f"{error.strerror or error}. Free space there or choose another page_dir."
            ) from error
        finally:
            os.close(fd)
        # Keep the page cache in small folios: a write fault maps a whole large folio (up to
        # 2 MiB), which would put bytes of neighbouring pages into our resident set behind the
        # budget's back. MADV_RANDOM stops fault readahead from building large folios.
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
        mapping.madvise(mmap.MADV_RANDOM)
        self._maps.append(mapping)
        self._tensors.append(torch.frombuffer(mapping, dtype=torch.uint8))
        return len(self._maps) - 1

    @override
    def _view(self, extent: Extent) -> torch.Tensor:
        return self._tensors[extent.region][extent.offset : extent.offset + extent.nbytes]

    @override
    def _start_prefetch(self, extent: Extent) -> None:
        self._maps[extent.region].madvise(mmap.MADV_WILLNEED, extent.offset, self._span(extent))

    @override
    def _drop(self, extent: Extent) -> None:
        self._maps[extent.region].madvise(mmap.MADV_DONTNEED, extent.offset, self._span(extent))
