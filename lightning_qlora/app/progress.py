"""A training progress bar counted in optimizer steps: ``Training (epoch 0) ━━━ 12/30 0:01:02 • 0:01:33 5.2 s/it``.

Lightning's ``RichProgressBar`` counts the batches of the current epoch and names the bar
``Epoch {e}/{max_epochs - 1}`` -- with ``max_steps`` set that reads ``Epoch 0/-2`` over a bar of 500
batches that stops at 30, and its speed column shows ``0.00it/s`` until Rich has two samples in its
window. This bar shows ``global_step/max_steps`` (continuing from the checkpoint's step on resume)
and the average rate since the bar started, as ``it/s`` or, for slow steps, ``s/it``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import ProgressColumn, Task
from rich.text import Text
from typing_extensions import override


class AverageRateColumn(ProgressColumn):
    """Items per second since the task started (``s/it`` below one per second); ``–`` before the first."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("first_completed", 0)
        elapsed = task.elapsed
        if not done or not elapsed:
            return Text("–", style="progress.data.speed")
        rate = done / elapsed
        return Text(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it", style="progress.data.speed")


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar counts optimizer steps up to ``max_steps`` (same arguments)."""

    @property
    @override
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    @override
    def configure_columns(self, trainer: L.Trainer) -> list:
        *columns, _ = super().configure_columns(trainer)  # the last one is the 0.00it/s speed column
        return [*columns, AverageRateColumn()]

    def _get_train_description(self, current_epoch: int) -> str:
        # RichProgressBar's private naming hook (used when it creates or resets the bar): overriding it is
        # what keeps "Epoch 0/-2" from showing for one frame before _show_step renames the bar
        if self.trainer.max_steps > 0:
            return f"Training (epoch {current_epoch})"
        return super()._get_train_description(current_epoch)

    def _show_step(self, trainer: L.Trainer, first: bool = False) -> None:
        if self.progress is None or self.train_progress_bar_id is None or not trainer.max_steps > 0:
            return
        fields: dict[str, Any] = {"first_completed": trainer.global_step} if first else {}
        self.progress.update(
            self.train_progress_bar_id,
            completed=trainer.global_step,
            description=f"Training (epoch {trainer.current_epoch})",
            **fields,
        )
        self.refresh()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer, first=True)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_step(trainer)
