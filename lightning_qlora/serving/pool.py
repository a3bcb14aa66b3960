"""One fixed pool of equal-size pages for the KV cache and the adapter weights (S-LoRA's unified paging).

S-LoRA (Sheng et al., https://arxiv.org/abs/2311.03285) keeps KV cache and LoRA weights of any
rank in one pool of pages allocated once, so memory moves freely between long contexts and many
adapters without fragmentation. Here a page is ``page_size`` float32 values:

* an adapter's factor row (a row of ``lora_A``, length ``in``; a column of ``lora_B``, length
  ``out``) never straddles pages, so the BGMV kernel reads it at one offset
  (``page * page_size + slot * row_length``);
* a KV page holds ``page_size // (2 * kv_dim)`` tokens of one layer.

The pool is instrumented: it counts allocations, frees and the high-water mark, and it can
never hand out more pages than it has (:class:`PoolExhaustedError` instead).

Example:
    >>> pool = PagePool(num_pages=64, page_size=256)
    >>> pages = pool.allocate(3, owner="kv:req-1")
    >>> pool.free(pages)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from lightning_qlora.serving.errors import PoolExhaustedError


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's occupancy.

    Attributes:
        num_pages: pages in the pool.
        used_pages: pages allocated now.
        peak_pages: most pages ever allocated at once.
        kv_pages / adapter_pages / prefix_pages: used pages by kind (owner prefix ``kv:`` /
            ``adapter:`` / ``prefix:``, the prompt blocks kept for reuse).
        allocations / frees: calls so far.
    """

    num_pages: int
    used_pages: int
    peak_pages: int
    kv_pages: int
    adapter_pages: int
    allocations: int
    frees: int
    prefix_pages: int = 0

    @property
    def occupancy(self) -> float:
        """Fraction of pages in use."""
        return self.used_pages / self.num_pages


class PagePool:
    """``num_pages`` pages of ``page_size`` float32 values, allocated once.

    Args:
        num_pages: pages in the pool (>= 1).
        page_size: float32 values per page (>= 1); must hold the longest factor row served
            and the K+V of at least one token of one layer.
        device: where the pool lives.
    """

    def __init__(self, num_pages: int, page_size: int, device: torch.device | str = "cpu") -> None:
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PagePool {name}={value!r} must be a positive integer.")
        self.num_pages = num_pages
        self.page_size = page_size
        self.data = torch.zeros(num_pages * page_size, dtype=torch.float32, device=device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._owner: dict[int, str] = {}
        self._lock = threading.Lock()
        self._peak = 0
        self._allocations = 0
        self._frees = 0

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages(self, page_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """``(len(page_ids), page_size)`` view-by-copy of the given pages (for inspection and tests)."""
        return self.data.view(self.num_pages, self.page_size)[torch.as_tensor(page_ids, dtype=torch.long)]

    def allocate(self, count: int, owner: str) -> list[int]:
        """Take ``count`` free pages for ``owner`` (``"kv:<request>"`` or ``"adapter:<name>"``).

        Raises:
            PoolExhaustedError: fewer than ``count`` pages are free; nothing is allocated then.
        """
        if count < 0:
            raise ValueError(f"cannot allocate {count} pages.")
        with self._lock:
            if count > len(self._free):
                raise PoolExhaustedError(
                    f"{owner} needs {count} pages but only {len(self._free)} of {self.num_pages} are free; "
                    "free some (finish requests, evict adapters) or start the server with more pages."
                )
            taken = [self._free.pop() for _ in range(count)]
            for page in taken:
                self._owner[page] = owner
            self._allocations += 1
            self._peak = max(self._peak, self.num_pages - len(self._free))
            return taken

    def free(self, page_ids: list[int]) -> None:
        """Return pages to the pool; freeing a page that is not allocated is an error."""
        with self._lock:
            for page in page_ids:
                if page not in self._owner:
                    raise ValueError(f"page {page} is not allocated (double free?).")
            for page in page_ids:
                del self._owner[page]
                self._free.append(page)
            self._frees += 1

    def reassign(self, page_ids: list[int], owner: str) -> None:
        """Hand allocated pages to another owner (a request's prompt block kept by the prefix cache)."""
        with self._lock:
            for page in page_ids:
                if page not in self._owner:
                    raise ValueError(f"page {page} is not allocated; only allocated pages change owner.")
            for page in page_ids:
                self._owner[page] = owner

    def owners(self) -> dict[int, str]:
        """Allocated page -> owner (a copy)."""
        with self._lock:
            return dict(self._owner)

    def stats(self) -> PoolStats:
        with self._lock:
            kinds = [owner.partition(":")[0] for owner in self._owner.values()]
            return PoolStats(
                self.num_pages,
                self.num_pages - len(self._free),
                self._peak,
                kinds.count("kv"),
                kinds.count("adapter"),
                self._allocations,
                self._frees,
                kinds.count("prefix"),
            )
