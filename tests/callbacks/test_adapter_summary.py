"""AdapterSummary prints adapters, ranks, trainable parameters and quantization savings at fit start."""

from __future__ import annotations

import logging

from lightning_qlora.adapters import AdaLoRAConfig
from lightning_qlora.callbacks import AdapterSummary
from lightning_qlora.plugins import NF4Precision
from tests.callbacks.tiny import TinyLlamaQLoRA, trainer


def test_summary_is_printed_at_fit_start(caplog):
    module = TinyLlamaQLoRA()
    plugin = NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=AdaLoRAConfig(r=4))
    with caplog.at_level(logging.INFO):
        trainer(max_steps=1, plugins=[plugin], callbacks=[AdapterSummary(max_rows=3)]).fit(module)
    text = caplog.text
    assert "model.model.layers.0.self_attn.q_proj" in text and "adalora" in text
    assert "... 11 more adapter layers" in text
    # 14 adapters of r (in + out + 1): q/o 64x64, k/v 64->32, gate/up 64->128, down 128->64, two blocks
    per_block = 4 * (64 + 64 + 1) * 2 + 4 * (64 + 32 + 1) * 2 + 4 * (64 + 128 + 1) * 3
    assert f"trainable {2 * per_block:,} of" in text
    # 4-bit weights: 14 layers, 2 * (2*64*64 + 2*64*32 + 3*64*128) elements at 4.127 bits
    assert "bits per parameter" in text and "MiB instead of" in text
