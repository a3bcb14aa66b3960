"""Lightning strategies that carry paged optimizers: ``strategy="paged"`` and ``strategy="paged_ddp"``.

``Trainer(strategy="paged")`` (one device) or ``Trainer(strategy=PagedDDPStrategy(...))``
converts the LightningModule's optimizers into paged ones right after
``configure_optimizers`` (:func:`~lightning_qlora.optim.to_paged_optimizer`: same parameter
groups, e.g. LoRA+'s, and the LR schedulers re-pointed), so optimizer state larger than the
device's free memory does not stop training. The strategy is the one owner of paging:

* Lightning moves optimizer state to the device on setup and after a checkpoint load
  (``_optimizer_to_device`` calls ``.to`` on every state value). Our paged state is a
  :class:`~lightning_qlora.optim.PagedState` handle without ``.to``, so it stays paged.
* Checkpoints hold the state as ordinary tensors in the format of the optimizer it replaces
  (``torch.optim.AdamW`` / bitsandbytes ``AdamW8bit``); loading writes them back into pages.
* With ``implementation="bitsandbytes"`` (CUDA only), bitsandbytes' paged optimizers are used
  and their state is re-paged after a checkpoint load, instead of being materialized on the
  device as a plain load would (bitsandbytes#1381).

Example:
    >>> trainer = L.Trainer(strategy=PagedStrategy(store="mmap", budget_bytes=64 << 20, page_dir="/scratch"),
    ...                     plugins=[NF4Precision()])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from typing_extensions import override

from lightning_qlora.optim.convert import (
    PagingConfig,
    repage_bitsandbytes_state,
    repoint_lr_schedulers,
    to_paged_optimizer,
)
from lightning_qlora.optim.paged import PagedOptimizer
from lightning_qlora.plugins.atomic_checkpoint_io import AtomicCheckpointIODefault


def page_strategy_optimizers(strategy: pl.strategies.Strategy, config: PagingConfig) -> None:
    """Replace ``strategy.optimizers`` by paged ones and re-point the LR schedulers to them."""
    paged_optimizers = []
    for optimizer in strategy.optimizers:
        paged = to_paged_optimizer(optimizer, config)
        if paged is not optimizer:
            repoint_lr_schedulers(strategy.lr_scheduler_configs, optimizer, paged)
        paged_optimizers.append(paged)
    strategy.optimizers = paged_optimizers


def load_paged_optimizer_states(strategy: pl.strategies.Strategy, checkpoint: Mapping[str, Any]) -> None:
    """Restore optimizer states without materializing paged state on the device."""
    for optimizer, state in zip(strategy.optimizers, checkpoint["optimizer_states"], strict=False):
        optimizer.load_state_dict(state)
        if isinstance(optimizer, PagedOptimizer):
            continue  # the state went straight into its pages
        if repage_bitsandbytes_state(optimizer) == 0:
            _optimizer_to_device(optimizer, strategy.root_device)


class _PagedOptimizerHooks:
    """The two hooks both paged strategies override (put first in the bases, before Lightning's)."""

    paging: PagingConfig

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]
        page_strategy_optimizers(self, self.paging)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        load_paged_optimizer_states(self, checkpoint)


class PagedStrategy(AtomicCheckpointIODefault, _PagedOptimizerHooks, SingleDeviceStrategy):
    """One-device training with paged optimizers; registered as ``strategy="paged"``.

    Args:
        store: ``"auto"`` (CUDA managed memory on GPU; on CPU the file store if ``budget_bytes``
            or ``page_dir`` is given, else host memory), ``"host"``, ``"mmap"`` or ``"cuda"``.
        budget_bytes: most bytes of optimizer-state pages resident at once (``None``: no limit).
        page_dir: directory for the file store's page files (created; checked at setup).
        page_elements: parameter elements per page (default derived from the budget).
        optim_bits: ``8`` / ``32`` to force the state precision (``None`` keeps the optimizer's).
        implementation: ``"native"`` (default) or ``"bitsandbytes"`` (its paged optimizers, CUDA only).
        device: the device to train on (default: the accelerator's first device).
        **kwargs: passed to :class:`~lightning.pytorch.strategies.SingleDeviceStrategy`.
    """

    strategy_name = "paged"

    def __init__(
        self,
        store: str = "auto",
        budget_bytes: int | None = None,
        page_dir: str | os.PathLike[str] | None = None,
        page_elements: int | None = None,
        optim_bits: int | None = None,
        implementation: str = "native",
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_from_accelerator = device is None
        self.paging = PagingConfig(
            store=store,
            budget_bytes=budget_bytes,
            page_dir=page_dir,
            page_elements=page_elements,
            optim_bits=optim_bits,
            implementation=implementation,
        )

    @override
    def setup_environment(self) -> None:
        # a registered strategy is built without a device; take the accelerator's
        if self._device_from_accelerator and self.accelerator is not None:
            if type(self.accelerator).__name__ == "CUDAAccelerator" and torch.cuda.is_available():
                self._root_device = torch.device("cuda", torch.cuda.current_device())
        super().setup_environment()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="one device, paged optimizer state")


class PagedDDPStrategy(AtomicCheckpointIODefault, _PagedOptimizerHooks, DDPStrategy):
    """DDP with paged optimizers on every rank; registered as ``strategy="paged_ddp"``.

    Each rank pages its own replica of the optimizer state (the file store gives each rank its
    own unlinked page file). Arguments as :class:`PagedStrategy`; ``**kwargs`` go to
    :class:`~lightning.pytorch.strategies.DDPStrategy`.
    """

    strategy_name = "paged_ddp"

    def __init__(
        self,
        store: str = "auto",
        budget_bytes: int | None = None,
        page_dir: str | os.PathLike[str] | None = None,
        page_elements: int | None = None,
        optim_bits: int | None = None,
        implementation: str = "native",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.paging = PagingConfig(
            store=store,
            budget_bytes=budget_bytes,
            page_dir=page_dir,
            page_elements=page_elements,
            optim_bits=optim_bits,
            implementation=implementation,
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DDP, paged optimizer state on every rank")
