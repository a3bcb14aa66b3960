"""``AdapterSummary``: what is trained and what quantization saved, printed at fit start.

Like Lightning's ``ModelSummary``, but about adapters: one row per adapted layer (method,
shape, rank, trainable parameters), then trainable vs total parameters and the bytes the
4-bit base weights take against their float originals.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_qlora.adapters.summary import adapter_summary


class AdapterSummary(L.Callback):
    """Print :func:`~lightning_qlora.adapters.summary.adapter_summary` when fit starts.

    Args:
        max_rows: adapter rows to show (the rest are counted); totals always print.
    """

    def __init__(self, max_rows: int = 40) -> None:
        self.max_rows = max_rows

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(adapter_summary(pl_module, max_rows=self.max_rows))
