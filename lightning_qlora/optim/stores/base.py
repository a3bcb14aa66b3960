"""The page store interface: where paged optimizer state lives, and the resident budget.

A store owns byte regions reserved once, at optimizer construction, so that running out of
memory or disk fails at setup rather than mid-step. An optimizer addresses its state as
:class:`Extent` byte ranges (one per page) and, for each page of an update, calls::

    store.prefetch(next_page)          # start bringing the next page in (async where possible)
    view = store.fetch(page)           # uint8 tensor on the compute device, pinned until released
    ... update the page through views of ``view`` ...
    store.release(page, view, dirty=True)

Pages stay cached after release (least recently used first out) while the resident bytes
fit the budget; :attr:`PageStore.peak_resident_bytes` records the most ever held, which is what
tests and benchmarks compare with the budget. Extents handed to a store must start and end on
multiples of :attr:`PageStore.alignment`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_qlora.optim.errors import PageBudgetError, PagedOptimizerError


@dataclass(frozen=True)
class Extent:
    """A byte range ``[offset, offset + nbytes)`` of one region of a store."""

    region: int
    offset: int
    nbytes: int

    def sub(self, offset: int, nbytes: int) -> Extent:
        """The part of this extent starting ``offset`` bytes in, ``nbytes`` long."""
        return Extent(self.region, self.offset + offset, nbytes)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= value``."""
    return -(-value // multiple) * multiple


def format_bytes(nbytes: int) -> str:
    """``1536 -> '1.5 KiB'``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


class PageStore(ABC):
    """Byte regions holding optimizer state, brought to the compute device page by page.

    Args:
        budget_bytes: most bytes of pages held resident (ready for the compute device) at once;
            ``None`` for no limit. What "resident" means is the subclass's: mapped into the
            process for the file store, copied to the GPU for the pinned host store.
    """

    #: Extents must start and end on multiples of this many bytes.
    alignment: int = 64

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and (
            isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0
        ):
            raise PagedOptimizerError(f"budget_bytes={budget_bytes!r} must be a positive int (bytes) or None.")
        self.budget_bytes = budget_bytes
        self._resident: OrderedDict[tuple[int, int], Extent] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[tuple[int, int], int] = {}
        self._resident_bytes = 0
        self.peak_resident_bytes = 0
        self.reserved_bytes = 0

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the tensors :meth:`fetch` returns (where the update runs)."""

    @property
    def resident_bytes(self) -> int:
        """Bytes of pages currently resident (fetched, prefetched or cached)."""
        return self._resident_bytes

    def allocate(self, sizes: Sequence[int]) -> list[Extent]:
        """Reserve one region holding buffers of the given sizes (each rounded up to the alignment).

        All backing memory or disk space is reserved here; a failure raises
        :class:`~lightning_qlora.optim.errors.PageStoreSetupError` before any state exists.
        """
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += round_up(max(int(size), 1), self.alignment)
        region = self._reserve(max(total, self.alignment))
        self.reserved_bytes += max(total, self.alignment)
        return [Extent(region, offset, int(size)) for offset, size in zip(offsets, sizes, strict=True)]

    def fetch(self, extent: Extent) -> torch.Tensor:
        """The bytes of ``extent`` as a ``uint8`` tensor on :attr:`device`, pinned until :meth:`release`."""
        key = self._key(extent)
        if key in self._resident:
            self._resident.move_to_end(key)
        else:
            self._admit(extent)
        self._pins[key] = self._pins.get(key, 0) + 1
        return self._view(extent)

    def prefetch(self, extent: Extent) -> None:
        """Start bringing ``extent`` in so a later :meth:`fetch` finds it resident."""
        key = self._key(extent)
        if key in self._resident:
            self._resident.move_to_end(key)
            return
        self._admit(extent)
        self._start_prefetch(extent)

    def release(self, extent: Extent, view: torch.Tensor, dirty: bool) -> None:
        """Unpin ``extent``; if ``dirty``, ``view``'s bytes become the stored bytes."""
        key = self._key(extent)
        if dirty:
            self._write_back(extent, view)
        remaining = self._pins.get(key, 0) - 1
        if remaining > 0:
            self._pins[key] = remaining
        else:
            self._pins.pop(key, None)

    def read(self, extent: Extent) -> torch.Tensor:
        """A CPU copy of the bytes of ``extent`` (for checkpoints), through the budget like a fetch."""
        view = self.fetch(extent)
        try:
            return view.to("cpu", copy=True)
        finally:
            self.release(extent, view, dirty=False)

    def write(self, extent: Extent, data: torch.Tensor) -> None:
        """Overwrite the bytes of ``extent`` with ``data`` (``uint8``, ``extent.nbytes`` long)."""
        view = self.fetch(extent)
        try:
            view.copy_(data.reshape(-1))
        finally:
            self.release(extent, view, dirty=True)

    def synchronize(self) -> None:
        """Wait for asynchronous copies or migrations (no-op for synchronous stores)."""

    def _key(self, extent: Extent) -> tuple[int, int]:
        if extent.offset % self.alignment:
            raise PagedOptimizerError(
                f"page offset {extent.offset} is not a multiple of the store's alignment {self.alignment}."
            )
        return extent.region, extent.offset

    def _span(self, extent: Extent) -> int:
        """Bytes an extent occupies once resident (whole alignment units)."""
        return round_up(extent.nbytes, self.alignment)

    def _admit(self, extent: Extent) -> None:
        span = self._span(extent)
        if self.budget_bytes is not None:
            for key in list(self._resident):
                if self._resident_bytes + span <= self.budget_bytes:
                    break
                if key not in self._pins:
                    evicted = self._resident.pop(key)
                    self._drop(evicted)
                    self._resident_bytes -= self._span(evicted)
            if self._resident_bytes + span > self.budget_bytes:
                raise PageBudgetError(
                    f"the resident budget of {format_bytes(self.budget_bytes)} cannot hold another page of "
                    f"{format_bytes(span)} ({format_bytes(self._resident_bytes)} pinned); raise budget_bytes or "
                    "lower page_elements so that two pages fit."
                )
        self._resident[self._key(extent)] = extent
        self._resident_bytes += span
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes)

    @abstractmethod
    def _reserve(self, nbytes: int) -> int:
        """Reserve a zero-filled region of ``nbytes``; return its index."""

    @abstractmethod
    def _view(self, extent: Extent) -> torch.Tensor:
        """The resident bytes of ``extent`` on :attr:`device` (called after admission)."""

    def _start_prefetch(self, extent: Extent) -> None:  # noqa: B027 -- optional hook
        """Begin an asynchronous transfer of ``extent`` (default: nothing to do)."""

    def _write_back(self, extent: Extent, view: torch.Tensor) -> None:  # noqa: B027 -- optional hook
        """Store ``view`` as the bytes of ``extent`` (default: ``view`` aliases the storage)."""

    def _drop(self, extent: Extent) -> None:  # noqa: B027 -- optional hook
        """Give up the resident copy of ``extent`` (its data must already be stored)."""
