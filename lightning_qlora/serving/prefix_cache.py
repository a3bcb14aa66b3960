"""KV pages of prompt blocks already computed, shared by later requests that start the same way.

Chat prompts start alike: the chat template and a system prompt are ~30 of the ~38 tokens of a
short request to SmolLM2-Instruct. Once a prompt is prefilled, each of its *full* KV blocks (one
page per layer holding ``tokens_per_page`` positions) is kept here under its exact key -- the
adapter (LoRA changes K and V from the first layer on, so adapters never share), the block
before it, and its own token ids -- and a later request with the same adapter and leading tokens
maps those pages into its page table and prefills only the rest.

Exactness: a cached block holds the K/V of the same tokens at the same positions under the same
weights, so a request that reuses it attends to the values it would have computed itself (up to
the summation order of the batch it was computed in). Shared pages are read-only: a request
writes only positions past its cached prefix, and at least one prompt token is always prefilled
(its logits are the first sampled token's).

Blocks nobody references stay cached until their pages are needed (least recently used first):
admission reclaims them before it evicts an idle adapter, and the adapter registry reclaims them
before it refuses a load. The engine runs this from its one loop thread; a lock keeps
inspection from other threads (stats) consistent.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lightning_qlora.serving.pool import PagePool

#: Owner name of cached pages in the pool (``PoolStats.prefix_pages``).
PREFIX_OWNER = "prefix:cache"


@dataclass(eq=False)
class CachedBlock:
    """One full block of a cached prompt: ``pages`` (one per layer), referenced by ``refs`` requests."""

    uid: int
    key: tuple
    pages: list[int]
    adapter: object | None  # keeps the adapter object (its id is part of the key) alive
    refs: int = 0


@dataclass
class PrefixCacheStats:
    """Lookups that reused at least one block, tokens whose prefill was skipped, blocks stored / evicted."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


@dataclass
class PrefixCache:
    """Cached prompt blocks over ``pool``; see the module docs.

    Args:
        pool: the engine's page pool (cached pages are allocated there, owner :data:`PREFIX_OWNER`).
        num_layers: pages per block (one per decoder layer).
        tokens_per_page: positions one page holds.
    """

    pool: PagePool
    num_layers: int
    tokens_per_page: int
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _blocks: OrderedDict[tuple, CachedBlock] = field(default_factory=OrderedDict)  # least recently used first
    _uids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def pages(self) -> int:
        """Pool pages the cache holds (referenced or not)."""
        with self._lock:
            return len(self._blocks) * self.num_layers

    def _key(self, adapter: object | None, parent: CachedBlock | None, tokens: Sequence[int]) -> tuple:
        return (0 if adapter is None else id(adapter), parent.uid if parent is not None else 0, tuple(tokens))

    def lookup(self, adapter: object | None, prompt: Sequence[int]) -> list[CachedBlock]:
        """The longest chain of cached blocks ``prompt`` starts with under ``adapter``, each referenced once more.

        At most ``(len(prompt) - 1) // tokens_per_page`` blocks: one prompt token is always left to prefill.
        """
        tpp = self.tokens_per_page
        chain: list[CachedBlock] = []
        with self._lock:
            parent = None
            for index in range((len(prompt) - 1) // tpp):
                block = self._blocks.get(self._key(adapter, parent, prompt[index * tpp : (index + 1) * tpp]))
                if block is None:
                    break
                chain.append(block)
                parent = block
            for block in reversed(chain):  # parents end up more recent than their children: evicted after them
                block.refs += 1
                self._blocks.move_to_end(block.key)
            if chain:
                self.stats.hits += 1
                self.stats.reused_tokens += len(chain) * tpp
            else:
                self.stats.misses += 1
        return chain

    def store(
        self,
        adapter: object | None,
        prompt: Sequence[int],
        page_table: torch.Tensor,
        chain: list[CachedBlock],
        own_pages: list[int],
    ) -> None:
        """After a prefill: keep the prompt's full blocks past ``chain`` (the blocks it reused).

        ``page_table`` ``(num_layers, blocks)`` is the request's; the pages of each newly kept block
        move from ``own_pages`` (the request's private pages, edited in place) to the cache, and
        the request references the block (appended to ``chain``). A block already cached under the
        same key (another request prefilled the same prefix in the same step) stays the request's own.
        """
        tpp = self.tokens_per_page
        with self._lock:
            parent = chain[-1] if chain else None
            own = set(own_pages)
            for index in range(len(chain), len(prompt) // tpp):
                key = self._key(adapter, parent, prompt[index * tpp : (index + 1) * tpp])
                existing = self._blocks.get(key)
                if existing is not None:
                    parent = existing
                    continue
                pages = page_table[:, index].tolist()  # past the reused chain: the request's own pages
                self.pool.reassign(pages, PREFIX_OWNER)
                own.difference_update(pages)
                block = CachedBlock(next(self._uids), key, pages, adapter, refs=1)
                self._blocks[key] = block
                chain.append(block)
                parent = block
                self.stats.stored_blocks += 1
            own_pages[:] = [p for p in own_pages if p in own]

    def release(self, chain: list[CachedBlock]) -> None:
        """A request that referenced ``chain`` is done with it (the blocks stay cached, evictable)."""
        with self._lock:
            for block in chain:
                if block.refs <= 0:
                    raise ValueError(f"prefix block {block.uid} released more often than referenced.")
                block.refs -= 1
            chain.clear()

    def evict_until_free(self, pages: int) -> bool:
        """Free unreferenced blocks, least recently used first, until ``pages`` pool pages are free."""
        with self._lock:
            for key in [k for k, b in self._blocks.items() if b.refs == 0]:
                if self.pool.free_pages >= pages:
                    break
                self.pool.free(self._blocks.pop(key).pages)
                self.stats.evicted_blocks += 1
            return self.pool.free_pages >= pages

    def clear(self) -> int:
        """Drop every unreferenced block; returns the pages freed."""
        with self._lock:
            before = self.pool.free_pages
            self.evict_until_free(self.pool.num_pages)
            return self.pool.free_pages - before
