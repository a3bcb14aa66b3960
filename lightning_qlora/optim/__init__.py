"""Paged optimizers: optimizer state in pages off the compute device, brought in page by page.

* :class:`PagedAdamW` -- 32-bit state, bit-exact with ``torch.optim.AdamW``.
* :class:`PagedAdamW8bit` -- blockwise 8-bit state with dynamic quantization (bitsandbytes-style).
* page stores (:mod:`lightning_qlora.optim.stores`): host memory (pinned for GPU offload), a
  memory-mapped file with an LRU resident budget, CUDA managed memory with prefetch.
* :func:`to_paged_optimizer` converts a ``torch.optim.AdamW`` / bitsandbytes AdamW into a paged one,
  keeping its parameter groups; the ``"paged"`` Lightning strategy does this for you.

Example:
    >>> from lightning_qlora.optim import MmapPageStore, PagedAdamW
    >>> model = torch.nn.Linear(256, 256)
    >>> optimizer = PagedAdamW(model.parameters(), store=MmapPageStore(budget_bytes=1 << 20))
"""

from lightning_qlora.optim.adamw import PagedAdamW, PagedAdamW8bit, unsigned_dynamic_map_8bit
from lightning_qlora.optim.convert import SUPPORTED_OPTIMIZERS, PagingConfig, repoint_lr_schedulers, to_paged_optimizer
from lightning_qlora.optim.errors import (
    PageBudgetError,
    PagedOptimizerError,
    PageStoreError,
    PageStoreSetupError,
    PageStoreUnavailableError,
    UnsupportedOptimizerError,
)
from lightning_qlora.optim.layout import PagedState
from lightning_qlora.optim.paged import PagedOptimizer
from lightning_qlora.optim.stores import (
    CudaManagedPageStore,
    HostPageStore,
    MmapPageStore,
    PageStore,
    make_page_store,
)

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "CudaManagedPageStore",
    "HostPageStore",
    "MmapPageStore",
    "PageBudgetError",
    "PageStore",
    "PageStoreError",
    "PageStoreSetupError",
    "PageStoreUnavailableError",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedOptimizer",
    "PagedOptimizerError",
    "PagedState",
    "PagingConfig",
    "UnsupportedOptimizerError",
    "make_page_store",
    "repoint_lr_schedulers",
    "to_paged_optimizer",
    "unsigned_dynamic_map_8bit",
]
