"""``QLoRAModule``: a LightningModule for fine-tuning a transformers causal LM with QLoRA.

Pair it with :class:`~lightning_qlora.plugins.NF4Precision`. It adds every adapter's
``extra_loss()`` (AdaLoRA's orthogonality, a mixture's load balancing) to the LM loss, builds
AdamW over the adapters' parameter groups (so LoRA+ gets its faster B), runs Delta-LoRA's
base update after each optimizer step, converts the model before a checkpoint is restored, and
with ``adapters_only_checkpoints=True`` writes checkpoints that hold only the adapters (the
4-bit base is re-created from the float model, deterministically).

Batches are dicts with ``input_ids`` (and optionally ``attention_mask`` and ``labels``; labels
default to the input ids, with -100 ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import adapter_layers, adapter_param_groups, delta_lora_step
from lightning_qlora.adapters.io import adapter_state_dict
from lightning_qlora.plugins import convert_before_checkpoint_restore


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
    """

    def __init__(self, model: nn.Module, lr: float = 2e-4, weight_decay: float = 0.0,
                 adapters_only_checkpoints: bool = False,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.lr = getattr(optimizer, "keywords", {}).get("lr", lr)
        self.weight_decay = weight_decay
        self.adapters_only_checkpoints = adapters_only_checkpoints
        # adapters-only checkpoints leave the base out on purpose
        self.strict_loading = not adapters_only_checkpoints

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.get("labels", batch["input_ids"])
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        extra = sum((layer.extra_loss() for layer in adapter_layers(self.model).values()), out.loss.new_zeros(()))
        return out.loss, extra

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss, extra = self._loss(batch)
        self.log("train/loss", lm_loss, prog_bar=True)
        if extra.requires_grad or extra.item() != 0:
            self.log("train/extra_loss", extra)
        return lm_loss + extra

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss, _ = self._loss(batch)
        self.log("val/loss", lm_loss, prog_bar=True)
        return lm_loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = adapter_param_groups(self.model, self.lr)
        if not groups:
            raise RuntimeError(
                "the model has no adapters: train QLoRAModule with plugins=[NF4Precision(...)] "
                "or inject adapters first (lightning_qlora.adapters.inject_adapters)."
            )
        if self.optimizer_factory is not None:
            return self.optimizer_factory(groups)
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)

    @override
    def on_train_start(self) -> None:
        # pretrained loaders return models in eval mode and Lightning keeps the mode it is given:
        # train mode turns the adapters' dropout (and LoRA-drop's importance tracking) on
        self.model.train()

    @override
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this right after each optimizer step (also under gradient accumulation)
        delta_lora_step(self.model)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapters_only_checkpoints:
            checkpoint["state_dict"] = {f"model.{k}": v for k, v in adapter_state_dict(self.model).items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        convert_before_checkpoint_restore(self, checkpoint)
