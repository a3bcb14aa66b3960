"""How one page of optimizer state is laid out in bytes, and where a parameter's pages are.

A page covers parameter elements ``[start, stop)`` and holds every state tensor ("slot") for
those elements back to back, e.g. AdamW's ``exp_avg`` and ``exp_avg_sq`` (float32, one item
per element) or the 8-bit variant's codes (uint8, one per element) and absmax constants
(float32, one per block of 256 elements). Keeping all slots of a page together means one
fetch brings in everything an update of those elements touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_qlora.optim.stores.base import Extent, round_up

_SLOT_ALIGNMENT = 64  # bytes; keeps every slot view aligned for vectorized kernels


@dataclass(frozen=True)
class Slot:
    """One state tensor of a parameter: ``name``, ``dtype``, one item per ``per`` parameter elements."""

    name: str
    dtype: torch.dtype
    per: int = 1

    def items(self, elements: int) -> int:
        """Items of this slot covering ``elements`` parameter elements."""
        return -(-elements // self.per)


@dataclass(frozen=True)
class PageLayout:
    """The slots of a page, in byte order."""

    slots: tuple[Slot, ...]

    def offsets(self, elements: int) -> tuple[list[int], int]:
        """Byte offset of each slot in a page of ``elements`` elements, and the page's bytes."""
        offsets, total = [], 0
        for slot in self.slots:
            offsets.append(total)
            total += round_up(slot.items(elements) * slot.dtype.itemsize, _SLOT_ALIGNMENT)
        return offsets, total

    def nbytes(self, elements: int) -> int:
        """Bytes of a page of ``elements`` elements."""
        return self.offsets(elements)[1]

    def views(self, page: torch.Tensor, elements: int) -> dict[str, torch.Tensor]:
        """Typed 1-D views of each slot inside the ``uint8`` tensor ``page`` (no copies)."""
        offsets, _ = self.offsets(elements)
        views = {}
        for slot, offset in zip(self.slots, offsets, strict=True):
            nbytes = slot.items(elements) * slot.dtype.itemsize
            views[slot.name] = page[offset : offset + nbytes].view(slot.dtype)
        return views


@dataclass(frozen=True)
class Page:
    """Elements ``[start, stop)`` of a parameter and the store extent holding their state."""

    start: int
    stop: int
    extent: Extent


class PagedState:
    """Where one parameter's optimizer state lives in a page store.

    It is what ``optimizer.state[p]["paged"]`` holds. It deliberately has no ``.to`` method,
    so Lightning's optimizer-state device moves (``_optimizer_to_device``, which calls ``.to``
    on every state value but ``step``) leave the state in its pages instead of materializing it.
    """

    __slots__ = ("layout", "numel", "pages", "shape")

    def __init__(self, layout: PageLayout, shape: torch.Size, pages: list[Page]) -> None:
        self.layout = layout
        self.shape = shape
        self.numel = shape.numel()
        self.pages = pages

    def __repr__(self) -> str:
        names = ", ".join(slot.name for slot in self.layout.slots)
        return f"PagedState({names}; shape={tuple(self.shape)}, pages={len(self.pages)})"


def page_ranges(numel: int, page_elements: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` splitting ``numel`` elements into pages of ``page_elements``."""
    return [(start, min(numel, start + page_elements)) for start in range(0, max(numel, 1), page_elements)]
