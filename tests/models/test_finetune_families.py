"""Each family, loaded straight into 4 bits, fine-tunes (plain Trainer + NF4Precision), resumes and exports to PEFT.

Pinned: resuming from the step-2 checkpoint gives bit-for-bit the adapters of the run that
never stopped (3 steps), and PEFT -- on the float model holding our dequantized base weights --
reproduces our fine-tuned logits.
"""

from __future__ import annotations

import lightning as L
import peft
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_qlora.adapters import LoRAConfig, adapter_layers, export_peft
from lightning_qlora.models import load_causal_lm
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision
from lightning_qlora.quantization import Linear4bit
from tests.models.checkpoints import FAMILIES


def _batches() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 100, (16,), generator=generator)} for _ in range(4)]
    return DataLoader(rows, batch_size=2, shuffle=False)  # 2 steps per epoch: step 2 ends an epoch


def _trainer(max_steps: int, **kwargs) -> L.Trainer:
    plugin = NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8))
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        plugins=[plugin],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _module(directory) -> QLoRAModule:
    model, _ = load_causal_lm(directory, mode="nf4-dq", compute_dtype="fp32")
    return QLoRAModule(model, lr=1e-2, adapters_only_checkpoints=True)


def _adapter_tensors(module: QLoRAModule) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name, layer in adapter_layers(module.model).items()
        for k, v in layer.state_dict().items()
        if not k.startswith("base.")
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_resumes_and_exports_to_peft(family, tiny_checkpoints, tmp_path):
    directory = tiny_checkpoints[family]
    straight = _module(directory)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _trainer(3, callbacks=[checkpoints]).fit(straight, _batches())
    layers = adapter_layers(straight.model)
    assert layers and all(isinstance(layer.base, Linear4bit) for layer in layers.values())
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # the adapters trained

    resumed = _module(directory)
    (step2,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    trainer = _trainer(3, enable_checkpointing=False)
    trainer.fit(resumed, _batches(), ckpt_path=step2)
    assert trainer.global_step == 3
    expected, got = _adapter_tensors(straight), _adapter_tensors(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    export_peft(straight.model, tmp_path / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():  # the float model with our 4-bit base weights, dequantized
        for name, layer in layers.items():
            base.get_submodule(name).weight.copy_(layer.base.weight.dequantize(torch.float32))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokens = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    straight.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=tokens).logits, straight.model(input_ids=tokens).logits, rtol=0, atol=1e-4
        )
