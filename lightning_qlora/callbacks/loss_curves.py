"""``LossCurves``: training and validation loss over steps, as a PNG at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

from lightning_qlora.callbacks.plots import log_dir, log_image, loss_curves


class LossCurves(L.Callback):
    """Record ``train/loss`` at every optimizer step and ``val/loss`` at every validation; plot both.

    Args:
        filename: PNG written when fit ends.
        dirpath: directory of the PNG (default: the logger's directory).
        train_key: logged metric holding the training loss.
        val_key: logged metric holding the validation loss.
    """

    def __init__(
        self,
        filename: str = "loss_curves.png",
        dirpath: str | None = None,
        train_key: str = "train/loss",
        val_key: str = "val/loss",
    ) -> None:
        self.filename, self.dirpath, self.train_key, self.val_key = filename, dirpath, train_key, val_key
        self.train: tuple[list[int], list[float]] = ([], [])
        self.val: tuple[list[int], list[float]] = ([], [])

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = trainer.callback_metrics.get(self.train_key)
        if value is not None and (not self.train[0] or self.train[0][-1] != trainer.global_step):
            self.train[0].append(trainer.global_step)
            self.train[1].append(float(value))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.val_key)
        if value is not None and not trainer.sanity_checking:
            self.val[0].append(trainer.global_step)
            self.val[1].append(float(value))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0 or not self.train[0]:
            return
        curves = {"train": self.train, **({"validation": self.val} if self.val[0] else {})}
        directory = Path(self.dirpath) if self.dirpath is not None else log_dir(trainer)
        path = loss_curves(curves, directory / self.filename, title="loss (answer tokens)")
        log_image(trainer, "loss_curves", path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"train": [list(v) for v in self.train], "val": [list(v) for v in self.val]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = tuple(list(v) for v in state_dict.get("train", ([], [])))  # type: ignore[assignment]
        self.val = tuple(list(v) for v in state_dict.get("val", ([], [])))  # type: ignore[assignment]
