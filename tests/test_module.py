"""QLoRAModule with NF4Precision: extra losses, Delta-LoRA hook, adapters-only checkpoints and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_qlora.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision

transformers = pytest.importorskip("transformers")


def _module(**kwargs) -> QLoRAModule:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return QLoRAModule(transformers.LlamaForCausalLM(config), lr=1e-2, **kwargs)


def _data() -> DataLoader:
    ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def _fit(module: QLoRAModule, steps: int, adapter, tmp_path=None, ckpt_path=None, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=adapter)],
    )
    L.seed_everything(0)
    trainer.fit(module, train_dataloaders=_data(), ckpt_path=ckpt_path)
    return trainer


def test_adalora_extra_loss_is_added_and_logged():
    module = _module()
    trainer = _fit(module, 6, AdaLoRAConfig(r=4, alpha=8))
    assert "train/extra_loss" in trainer.callback_metrics and trainer.callback_metrics["train/extra_loss"] > 0
    assert len(adapter_layers(module)) == 14


def test_adapters_only_checkpoint_is_small_and_resumes_exactly(tmp_path):
    adapter = LoRAConfig(r=4, alpha=8)
    full = _module()
    _fit(full, 12, adapter)

    first = _module(adapters_only_checkpoints=True)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=6)
    _fit(first, 6, adapter, callbacks=[checkpoint])
    path = next(tmp_path.glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)

    resumed = _module(adapters_only_checkpoints=True)
    _fit(resumed, 12, adapter, ckpt_path=str(path))
    expected, actual = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
