"""``LoRADrop``: LoRA-drop's two training stages as a Lightning callback.

LoRA-drop (Zhou et al., https://arxiv.org/abs/2402.07721):

1. Stage 1 -- every layer trains its own LoRA for ``stage1_steps`` optimizer steps (on the
   batches the loader yields, i.e. a sampled subset of the data when it shuffles) while each
   layer accumulates its importance ``I_l = mean over tokens of ||s B_l A_l x||^2``.
2. Selection -- importances are normalized (``I_l / sum I``) and sorted; the smallest set of
   layers whose cumulative importance reaches ``threshold`` (or the ``top_n`` most important)
   keeps its own adapter; every other layer shares one adapter per weight shape.
3. Stage 2 -- training continues on the full data; the optimizer is rebuilt for the new
   parameter set (kept layers carry their optimizer state over; learning-rate schedulers
   continue where they were).

Trainable parameters after the switch, with ``r(in+out)`` per adapter:
``sum over kept layers + one per weight shape that has dropped layers``.

The selection is saved in the checkpoint, and the model's own state records which layers
share (``uses_shared``), so a resumed run rebuilds the stage-2 structure before the optimizer.

Example:
    >>> trainer = L.Trainer(plugins=[NF4Precision(adapter=LoRADropConfig(r=8))],
    ...                     callbacks=[LoRADrop(stage1_steps=100, threshold=0.9)])
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_qlora.adapters import LoRADropLayer, apply_lora_drop
from lightning_qlora.adapters.summary import trainable_parameter_count
from lightning_qlora.callbacks.errors import CallbackConfigError, required_layers
from lightning_qlora.callbacks.plots import importance_bars, log_dir, log_image


def select_layers(importances: dict[str, float], threshold: float = 0.9, top_n: int | None = None) -> list[str]:
    """Layers that keep their own adapter, most important first.

    ``top_n`` given: the ``top_n`` largest. Otherwise the smallest prefix of the layers sorted
    by importance whose normalized cumulative importance reaches ``threshold``.
    """
    order = sorted(importances, key=lambda name: (-importances[name], name))
    if top_n is not None:
        return order[:top_n]
    total = sum(importances.values())
    if not total > 0:
        raise CallbackConfigError(
            "LoRA-drop: every layer's importance is 0 after stage 1 (the adapters never changed the output); "
            "train stage 1 longer or with a higher learning rate."
        )
    kept, cumulative = [], 0.0
    for name in order:
        kept.append(name)
        cumulative += importances[name] / total
        if cumulative >= threshold - 1e-12:  # float sums of shares may fall a hair short of 1.0
            break
    return kept


class LoRADrop(L.Callback):
    """Select layers by output importance after a short stage 1, then share the rest.

    Args:
        stage1_steps: optimizer steps of stage 1 (all layers trained, importance measured).
        threshold: cumulative normalized importance the kept layers must reach, in (0, 1].
        top_n: keep exactly this many layers instead (overrides ``threshold``).
        plot: write ``lora_drop_importance.png`` to the log dir at the switch.
    """

    def __init__(
        self, stage1_steps: int = 100, threshold: float = 0.9, top_n: int | None = None, plot: bool = True
    ) -> None:
        if not isinstance(stage1_steps, int) or stage1_steps < 1:
            raise CallbackConfigError(f"LoRADrop: stage1_steps={stage1_steps!r} must be an int >= 1.")
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise CallbackConfigError(f"LoRADrop: threshold={threshold!r} must be in (0, 1], e.g. 0.9.")
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise CallbackConfigError(f"LoRADrop: top_n={top_n!r} must be an int >= 1 (or None to use the threshold).")
        self.stage1_steps, self.threshold, self.top_n, self.plot = stage1_steps, float(threshold), top_n, plot
        self.selected = False
        self.importances: dict[str, float] = {}
        self.kept: list[str] = []
        self.dropped: list[str] = []
        self.trainable_before = self.trainable_after = 0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = required_layers(pl_module, LoRADropLayer, "LoRADrop", "LoRA-drop", "LoRADropConfig")
        if self.top_n is not None and self.top_n > len(layers):
            raise CallbackConfigError(f"LoRADrop: top_n={self.top_n} exceeds the {len(layers)} LoRA-drop layers.")
        if not self.selected and not trainer.fast_dev_run and 0 < trainer.max_steps <= self.stage1_steps:
            raise CallbackConfigError(
                f"LoRADrop: stage1_steps={self.stage1_steps} leaves no stage 2 within max_steps={trainer.max_steps}; "
                "lower stage1_steps or train longer."
            )
        for layer in layers.values():
            layer.tracking = not self.selected

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.selected or trainer.global_step < self.stage1_steps:
            return
        layers = required_layers(pl_module, LoRADropLayer, "LoRADrop", "LoRA-drop", "LoRADropConfig")
        self.importances = {name: layer.importance() for name, layer in layers.items()}
        self.kept = select_layers(self.importances, self.threshold, self.top_n)
        self.trainable_before = trainable_parameter_count(pl_module)
        result = apply_lora_drop(pl_module, self.kept)
        self.dropped = result["dropped"]
        for layer in layers.values():
            layer.tracking = False
        _rebuild_optimizers(trainer)
        self.trainable_after = trainable_parameter_count(pl_module)
        self.selected = True
        self._report(trainer)

    def _report(self, trainer: L.Trainer) -> None:
        saving = 1 - self.trainable_after / max(self.trainable_before, 1)
        rank_zero_info(
            f"LoRA-drop at step {trainer.global_step}: {len(self.kept)} of {len(self.importances)} layers keep their "
            f"own adapter ({', '.join(self.kept)}); trainable parameters {self.trainable_before:,} -> "
            f"{self.trainable_after:,} ({100 * saving:.1f}% fewer)"
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "lora_drop/kept_layers": float(len(self.kept)),
                    "lora_drop/trainable_params": float(self.trainable_after),
                    "lora_drop/param_saving": saving,
                },
                step=trainer.global_step,
            )
        if self.plot and trainer.global_rank == 0:
            path = importance_bars(
                self.importances,
                set(self.kept),
                log_dir(trainer) / "lora_drop_importance.png",
                None if self.top_n is not None else self.threshold,
            )
            log_image(trainer, "lora_drop/importance", path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "importances": dict(self.importances),
            "kept": list(self.kept),
            "dropped": list(self.dropped),
            "trainable_before": self.trainable_before,
            "trainable_after": self.trainable_after,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self.selected = bool(state_dict["selected"])
            self.importances = {str(k): float(v) for k, v in state_dict["importances"].items()}
            self.kept, self.dropped = list(state_dict["kept"]), list(state_dict["dropped"])
            self.trainable_before = int(state_dict["trainable_before"])
            self.trainable_after = int(state_dict["trainable_after"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CallbackConfigError(f"LoRADrop state in the checkpoint is damaged ({error!r}).") from None


def _rebuild_optimizers(trainer: L.Trainer) -> None:
    """Re-run ``configure_optimizers`` for the new parameter set, keeping what carries over.

    Parameters present before and after keep their optimizer state; learning-rate schedulers
    are fast-forwarded to the current step so the schedule continues (schedulers here depend
    on the step count only, as Lightning's interval schedulers do).
    """
    old = list(trainer.optimizers)
    trainer.strategy.setup_optimizers(trainer)
    for before, after in zip(old, trainer.optimizers, strict=False):
        for group in after.param_groups:
            for param in group["params"]:
                if param in before.state:
                    after.state[param] = before.state[param]
    with warnings.catch_warnings():  # scheduler.step() before optimizer.step() is intended here
        warnings.simplefilter("ignore", UserWarning)
        for config in trainer.lr_scheduler_configs:
            steps = trainer.global_step if config.interval == "step" else trainer.current_epoch
            for _ in range(math.ceil(steps / max(config.frequency, 1))):
                config.scheduler.step()
