"""Lightning strategies carrying paged optimizers.

Importing this package registers ``strategy="paged"`` (:class:`PagedStrategy`, one device) and
``strategy="paged_ddp"`` (:class:`PagedDDPStrategy`) with Lightning's ``StrategyRegistry``; use
the classes directly to pass options (page store, resident budget, page directory, 8-bit state).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_qlora.strategies.paged import (
    PagedDDPStrategy,
    PagedStrategy,
    load_paged_optimizer_states,
    page_strategy_optimizers,
)

for _strategy in (PagedStrategy, PagedDDPStrategy):
    if _strategy.strategy_name not in StrategyRegistry:
        _strategy.register_strategies(StrategyRegistry)

__all__ = ["PagedDDPStrategy", "PagedStrategy", "load_paged_optimizer_states", "page_strategy_optimizers"]
