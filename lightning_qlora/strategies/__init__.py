"""Lightning strategies: paged optimizers, and FSDP for QLoRA models.

Importing this package registers ``strategy="paged"`` (:class:`PagedStrategy`, one device),
``strategy="paged_ddp"`` (:class:`PagedDDPStrategy`) and ``strategy="qlora_fsdp"``
(:class:`QLoRAFSDPStrategy`, CUDA or CPU) with Lightning's ``StrategyRegistry``; use the classes
directly to pass options (page store, resident budget, page directory, 8-bit state).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_qlora.strategies.fsdp import QLoRAFSDPStrategy, modules_with_4bit_weights
from lightning_qlora.strategies.paged import (
    PagedDDPStrategy,
    PagedStrategy,
    load_paged_optimizer_states,
    page_strategy_optimizers,
)

for _strategy in (PagedStrategy, PagedDDPStrategy, QLoRAFSDPStrategy):
    if _strategy.strategy_name not in StrategyRegistry:  # import lightning_qlora registers them lazily already
        _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "PagedDDPStrategy",
    "PagedStrategy",
    "QLoRAFSDPStrategy",
    "load_paged_optimizer_states",
    "modules_with_4bit_weights",
    "page_strategy_optimizers",
]
