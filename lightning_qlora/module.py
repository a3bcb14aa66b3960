"""``QLoRAModule``: a LightningModule for fine-tuning a transformers causal LM with QLoRA.

Pair it with :class:`~lightning_qlora.plugins.NF4Precision` -- or use your own LightningModule:
the plugin alone converts the model, adds every adapter's ``extra_loss()`` to the loss, runs the
per-step work (Delta-LoRA's base update) and resumes checkpoints. What this module adds is only
what is specific to causal-LM fine-tuning:

* the loss of a transformers causal LM (labels default to the input ids; -100 ignored), logged
  as ``train/loss`` / ``val/loss``, with the adapters' extra loss logged as ``train/extra_loss``;
  the vocabulary projection runs only at positions that have a target (:func:`causal_lm_loss`);
* AdamW (or any optimizer factory) over the adapters' parameter groups (LoRA+ gets its faster B),
  and optionally a learning-rate schedule stepped per optimizer step, sized to the run;
* train mode at fit start (pretrained loaders return eval-mode models; adapters' dropout and
  LoRA-drop's importance tracking need train mode);
* ``adapters_only_checkpoints=True``: checkpoints hold only the adapters (the 4-bit base is
  re-created from the float model, deterministically, and the plugin checks the settings match).

Batches are dicts with ``input_ids`` (and optionally ``attention_mask`` and ``labels``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import adapter_extra_loss, adapter_param_groups
from lightning_qlora.lm_loss import causal_lm_loss
from lightning_qlora.plugins import convert_before_checkpoint_restore
from lightning_qlora.plugins.checkpoint import keep_only_adapters


class QLoRAModule(L.LightningModule):
    """Causal-LM fine-tuning with adapters on a (to be) quantized model.

    Args:
        model: a transformers causal LM (anything returning ``.loss`` for ``labels=``).
        lr: learning rate of the adapters (LoRA+ multiplies B's).
        weight_decay: AdamW weight decay.
        optimizer: builds the optimizer from parameter groups (e.g. ``functools.partial(torch.optim.AdamW,
            lr=2e-4)`` or a Hydra ``_partial_`` config); its ``lr`` keyword, if any, replaces ``lr``.
            Default: AdamW with ``lr`` and ``weight_decay``.
        adapters_only_checkpoints: keep only adapter tensors in checkpoints.
        scheduler: builds a learning-rate scheduler from the optimizer (e.g.
            ``functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0)``);
            its length (``total_iters``, ``T_max`` or ``total_steps``), unless given, is the run's
            optimizer steps (``trainer.estimated_stepping_batches``). Stepped after every optimizer
            step; its state is in checkpoints, so a resumed run continues the same schedule.
            Default: none (a constant learning rate).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adapters_only_checkpoints: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr = getattr(optimizer, "keywords", {}).get("lr", lr)
        self.weight_decay = weight_decay
        self.adapters_only_checkpoints = adapters_only_checkpoints
        # adapters-only checkpoints leave the base out on purpose
        self.strict_loading = not adapters_only_checkpoints

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(self.model, batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss = self._loss(batch)
        self.log("train/loss", lm_loss, prog_bar=True)
        extra = adapter_extra_loss(self.model)  # the plugin adds it to the backpropagated loss; shown here
        if extra is not None:
            self.log("train/extra_loss", extra.detach())
        return lm_loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss = self._loss(batch)
        self.log("val/loss", lm_loss, prog_bar=True)
        return lm_loss

    @override
    def configure_optimizers(self) -> Any:
        groups = adapter_param_groups(self.model, self.lr)
        if not groups:
            raise RuntimeError(
                "the model has no adapters: train QLoRAModule with plugins=[NF4Precision(...)] "
                "or inject adapters first (lightning_qlora.adapters.inject_adapters)."
            )
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, **_schedule_length(self.scheduler_factory, self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_train_start(self) -> None:
        # pretrained loaders return models in eval mode and Lightning keeps the mode it is given:
        # train mode turns the adapters' dropout (and LoRA-drop's importance tracking) on
        self.model.train()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapters_only_checkpoints:
            keep_only_adapters(checkpoint, self.model, prefix="model.")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the plugin recorded its settings hold the converted layout
        convert_before_checkpoint_restore(self, checkpoint)


#: The keyword that sets a torch scheduler's length in optimizer steps, by scheduler
#: (LinearLR / PolynomialLR, CosineAnnealingLR, OneCycleLR).
_LENGTH_KEYWORDS = ("total_iters", "T_max", "total_steps")


def _schedule_length(factory: Callable[..., Any], trainer: L.Trainer) -> dict[str, int]:
    """``{keyword: the run's optimizer steps}`` for a scheduler factory that takes a length and was given none."""
    function = getattr(factory, "func", factory)
    given = getattr(factory, "keywords", {}) or {}
    try:
        accepted = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}
    for keyword in _LENGTH_KEYWORDS:
        if keyword in accepted and keyword not in given:
            steps = trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                raise ValueError(
                    f"the learning-rate schedule needs the run's length ({keyword}) but the trainer has none "
                    "(max_steps=-1 and max_epochs=-1); set trainer.max_steps, or pass the scheduler its "
                    f"{keyword}= yourself."
                )
            return {keyword: int(steps)}
    return {}
