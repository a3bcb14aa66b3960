"""Adapters loaded on demand into the page pool, evicted least-recently-used, pinned while in use.

The registry knows every adapter of a directory (one sub-directory each, our format or PEFT's)
but keeps only some in the pool. :meth:`AdapterRegistry.acquire` loads an adapter if needed --
evicting idle adapters, oldest use first, until its pages fit -- and pins it; :meth:`release`
unpins it. A pinned adapter (one a running request uses) is never evicted. Every eviction is
logged (``lightning_qlora.serving.registry`` at INFO) and recorded in :attr:`evictions`.

Layout in the pool: each factor row -- a row of ``lora_A`` (``in`` floats) or a column of
``lora_B`` (``out`` floats) -- is stored whole inside one page, rows packed one after another, so
the BGMV kernel reads it at one offset. Per adapter the registry keeps a table over the model's
adaptable modules (index ``m``): ``a_rows[m, j]`` / ``b_rows[m, j]`` pool offsets of rank row ``j``,
``ranks[m]`` (0 where the adapter does not adapt that module) and ``scales[m]``.

Example:
    >>> registry = AdapterRegistry(pool, module_shapes, adapters_dir="adapters/")
    >>> adapter = registry.acquire("support-bot")
    >>> registry.release(adapter)
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_qlora.serving.adapter_files import LoRAFactors, check_fits, is_adapter_dir, read_lora_factors
from lightning_qlora.serving.errors import AdapterFormatError
from lightning_qlora.serving.errors import PoolExhaustedError, ServerConfigError, UnknownAdapterError
from lightning_qlora.serving.pool import PagePool

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """An adapter resident in the pool (see the module docstring for the tables).

    Attributes:
        name: the adapter's name (its directory name).
        pages: the pool pages holding its factors.
        a_rows / b_rows: ``(M, R)`` int64 pool offsets; ``ranks`` ``(M,)`` int64; ``scales`` ``(M,)`` float32.
        pins: requests using it now.
    """

    name: str
    pages: list[int]
    a_rows: torch.Tensor
    b_rows: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    pins: int = 0


@dataclass
class RegistryStats:
    """Counters of the registry: ``loads``, ``evictions``, ``hits`` (acquired while resident)."""

    loads: int = 0
    hits: int = 0
    evicted: list[str] = field(default_factory=list)


def pages_for_rows(row_lengths: list[int], page_size: int) -> int:
    """Pages needed to pack rows of these lengths whole, in order, into pages of ``page_size``."""
    pages, used = 0, page_size  # "used = page_size" forces a first page
    for length in row_lengths:
        if used + length > page_size:
            pages, used = pages + 1, 0
        used += length
    return pages


class AdapterRegistry:
    """Adapters of one base model, loaded into ``pool`` on demand.

    Args:
        pool: the shared page pool.
        module_shapes: ``(in_features, out_features)`` of every adaptable module, in the
            module order the batched LoRA tables use.
        adapters_dir: a directory whose sub-directories are adapters (optional; see :meth:`register`).
    """

    def __init__(
        self, pool: PagePool, module_shapes: dict[str, tuple[int, int]], adapters_dir: str | Path | None = None
    ) -> None:
        self.pool = pool
        self.module_index = {name: index for index, name in enumerate(module_shapes)}
        self.module_shapes = dict(module_shapes)
        self._paths: dict[str, Path] = {}
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._checked: dict[
            str, tuple[tuple, int | AdapterFormatError]
        ] = {}  # name -> (file signature, pages or error)
        self._lock = threading.RLock()
        self.stats = RegistryStats()
        #: called with a page count before idle adapters are evicted for room (returns whether it freed enough)
        self.reclaim: Callable[[int], bool] | None = None
        if adapters_dir is not None:
            self.register_directory(adapters_dir)

    # -- what exists ---------------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Make the adapter in ``path`` servable as ``name`` (loaded on first use)."""
        path = Path(path)
        if not is_adapter_dir(path):
            raise AdapterFormatError(f"{path} is not an adapter directory (no adapter.json / adapter_config.json).")
        with self._lock:
            self._paths[name] = path

    def register_directory(self, adapters_dir: str | Path) -> list[str]:
        """Register every adapter sub-directory of ``adapters_dir`` under its directory name."""
        root = Path(adapters_dir)
        if not root.is_dir():
            raise ServerConfigError(
                f"adapters_dir={str(root)!r} is not a directory; give the directory whose sub-directories are adapters."
            )
        names = [child.name for child in sorted(root.iterdir()) if child.is_dir() and is_adapter_dir(child)]
        for name in names:
            self.register(name, root / name)
        return names

    def known(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def loaded(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def check_known(self, name: str) -> None:
        if name not in self._paths:
            raise UnknownAdapterError(name, self.known())

    # -- pool residency ------------------------------------------------------------------------
    def _read(self, name: str) -> LoRAFactors:
        """The validated factors of ``name``: readable, self-consistent, and fitting this base model."""
        try:
            factors = read_lora_factors(self._paths[name])
            check_fits(name, factors, self.module_shapes, self.pool.page_size)
        except AdapterFormatError as error:
            message = str(error)
            raise AdapterFormatError(
                message if message.startswith(f"adapter {name!r}") else f"adapter {name!r} cannot be served: {message}"
            ) from error
        return factors

    def _signature(self, name: str) -> tuple:
        """What identifies the files' current content cheaply (names, sizes, mtimes): a change re-validates."""
        try:
            return tuple(
                sorted(
                    (p.name, s.st_size, s.st_mtime_ns)
                    for p in self._paths[name].iterdir()
                    if p.is_file() and (s := p.stat())
                )
            )
        except OSError:
            return ()

    @staticmethod
    def _row_lengths(factors: LoRAFactors) -> list[int]:
        lengths = []
        for f in factors.modules.values():
            lengths += [f.lora_A.shape[1]] * f.rank + [f.lora_B.shape[0]] * f.rank
        return lengths

    def pages_needed(self, name: str) -> int:
        """Pages adapter ``name`` occupies once loaded; validates it (once per version of its files).

        Raises:
            UnknownAdapterError: no adapter of that name is registered.
            AdapterFormatError: its files cannot be served (the message names the adapter and the problem).
        """
        with self._lock:
            if name in self._loaded:
                return len(self._loaded[name].pages)
            self.check_known(name)
            signature = self._signature(name)
            cached = self._checked.get(name)
            if cached is None or cached[0] != signature:
                try:
                    cached = (signature, pages_for_rows(self._row_lengths(self._read(name)), self.pool.page_size))
                except AdapterFormatError as error:
                    cached = (signature, error)
                self._checked[name] = cached
            if isinstance(cached[1], AdapterFormatError):
                raise AdapterFormatError(str(cached[1]))
            return cached[1]

    def evictable_pages(self) -> int:
        """Pages held by resident adapters no request uses."""
        with self._lock:
            return sum(len(a.pages) for a in self._loaded.values() if a.pins == 0)

    def evict_until_free(self, pages: int) -> bool:
        """Evict idle adapters, least recently used first, until ``pages`` pages are free; whether that worked.

        :attr:`reclaim` (the engine's prefix cache) gives back what it can first: a cached prompt
        block is cheaper to recompute than an adapter to reload.
        """
        if self.reclaim is not None and self.pool.free_pages < pages:
            self.reclaim(pages)
        with self._lock:
            for name in [n for n, a in self._loaded.items() if a.pins == 0]:
                if self.pool.free_pages >= pages:
                    break
                self._evict(name)
            return self.pool.free_pages >= pages

    def _evict(self, name: str) -> None:
        adapter = self._loaded.pop(name)
        self.pool.free(adapter.pages)
        self.stats.evicted.append(name)
        log.info(
            "evicted adapter %r (%d pages, least recently used and idle); pool %d/%d pages used",
            name,
            len(adapter.pages),
            self.pool.used_pages,
            self.pool.num_pages,
        )

    def _load(self, name: str) -> LoadedAdapter:
        factors = self._read(name)  # again: the files may have changed since submission
        page_size = self.pool.page_size
        count = pages_for_rows(self._row_lengths(factors), page_size)
        if count > self.pool.num_pages:
            raise PoolExhaustedError(f"adapter {name!r} needs {count} pages but the pool has {self.pool.num_pages}.")
        if not self.evict_until_free(count):
            raise PoolExhaustedError(
                f"adapter {name!r} needs {count} pages; {self.pool.free_pages} are free and every resident adapter "
                "is in use. Retry when requests finish."
            )
        pages = self.pool.allocate(count, owner=f"adapter:{name}")
        modules = len(self.module_index)
        width = factors.max_rank
        a_rows = torch.zeros(modules, width, dtype=torch.int64)
        b_rows = torch.zeros(modules, width, dtype=torch.int64)
        ranks = torch.zeros(modules, dtype=torch.int64)
        scales = torch.zeros(modules, dtype=torch.float32)
        flat = self.pool.data
        page, used = -1, page_size

        def place(row: torch.Tensor) -> int:
            nonlocal page, used
            if used + row.numel() > page_size:
                page, used = page + 1, 0
            offset = pages[page] * page_size + used
            flat[offset : offset + row.numel()] = row
            used += row.numel()
            return offset

        for module, f in factors.modules.items():  # the same order as _row_lengths
            m = self.module_index[module]
            a_rows[m, : f.rank] = torch.tensor([place(f.lora_A[j]) for j in range(f.rank)])
            b_rows[m, : f.rank] = torch.tensor([place(f.lora_B[:, j]) for j in range(f.rank)])
            ranks[m], scales[m] = f.rank, f.scale
        self.stats.loads += 1
        log.info("loaded adapter %r: max rank %d, %d pages", name, width, count)
        return LoadedAdapter(name, pages, a_rows, b_rows, ranks, scales)

    def acquire(self, name: str) -> LoadedAdapter:
        """Pin adapter ``name`` in the pool, loading it (and evicting idle ones) if needed.

        Raises:
            UnknownAdapterError: no adapter of that name is registered.
            PoolExhaustedError: it cannot fit even after evicting every idle adapter.
        """
        with self._lock:
            self.check_known(name)
            adapter = self._loaded.get(name)
            if adapter is None:
                adapter = self._load(name)
                self._loaded[name] = adapter
            else:
                self.stats.hits += 1
            self._loaded.move_to_end(name)
            adapter.pins += 1
            return adapter

    def release(self, adapter: LoadedAdapter) -> None:
        """Unpin an adapter acquired before; it stays resident (evictable) until space is needed."""
        with self._lock:
            if adapter.pins <= 0:
                raise ValueError(f"adapter {adapter.name!r} released more often than acquired.")
            adapter.pins -= 1
