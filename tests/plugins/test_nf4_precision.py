"""NF4Precision turns a stock Trainer into a QLoRA trainer on CPU."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora.adapters import AdapterConfigError, LoRAConfig, adapter_layers, adapter_param_groups
from lightning_qlora.plugins import NF4Precision, convert_before_checkpoint_restore
from lightning_qlora.qlora import QLoRAConfigError, QLoRASpec, apply_qlora, resolve_compute_dtype
from lightning_qlora.quantization import Linear4bit

transformers = pytest.importorskip("transformers")


class TinyLlamaModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        self.model = transformers.LlamaForCausalLM(config)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def on_load_checkpoint(self, checkpoint):
        convert_before_checkpoint_restore(self, checkpoint)

    def configure_optimizers(self):
        return torch.optim.AdamW(adapter_param_groups(self, lr=1e-2))

    def train_dataloader(self):
        ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


def _trainer(**kwargs) -> L.Trainer:
    kwargs = {"max_steps": 30, "enable_checkpointing": False, **kwargs}
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def test_stock_trainer_fine_tunes_a_tiny_llama_with_nf4_dq():
    module = TinyLlamaModule()
    snapshot: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer = _trainer(
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=8, alpha=16))],
        callbacks=[Snapshot()],
    )
    trainer.fit(module)

    assert sum(module.losses[-5:]) < 0.9 * sum(module.losses[:5])  # measured: 4.59 -> 3.70
    layers = adapter_layers(module)
    assert len(layers) == 14 and all(isinstance(layer.base, Linear4bit) for layer in layers.values())
    after = module.state_dict()
    changed = {k for k in after if not torch.equal(after[k], snapshot[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)  # base bit-identical, embeddings too


def test_plugin_bad_input_is_typed_and_named():
    with pytest.raises(QLoRAConfigError, match="mode='nf3'.*nf4-dq"):
        NF4Precision(mode="nf3")
    with pytest.raises(QLoRAConfigError, match="compute_dtype='fp8'"):
        NF4Precision(compute_dtype="fp8")
    with pytest.raises(QLoRAConfigError, match="no nn.Linear"):
        apply_qlora(torch.nn.Sequential(torch.nn.ReLU()), QLoRASpec())
    with pytest.warns(UserWarning, match="r=512 exceeds min"):  # accepted per layer, as PEFT does (issue 13)
        apply_qlora(TinyLlamaModule(), QLoRASpec(adapter=LoRAConfig(r=512)))
    with pytest.raises(AdapterConfigError, match="matched no Linear layer"):
        apply_qlora(TinyLlamaModule(), QLoRASpec(target_modules=["nothing"]))
    with pytest.raises(QLoRAConfigError, match="not an adapter config"):
        QLoRASpec(adapter={"r": 8})


def test_auto_compute_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr("lightning_qlora.qlora.cpu_has_fast_bf16", lambda: False)
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr("lightning_qlora.qlora.cpu_has_fast_bf16", lambda: True)
    assert resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_compute_dtype("auto", "cuda") == torch.bfloat16


def _adapter_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def test_resume_from_step_10_matches_the_uninterrupted_run(tmp_path):
    plugin = dict(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8))
    full = TinyLlamaModule()
    L.seed_everything(0)
    _trainer(max_steps=20, plugins=[NF4Precision(**plugin)]).fit(full)

    first = TinyLlamaModule()
    L.seed_everything(0)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
        plugins=[NF4Precision(**plugin)],
    ).fit(first)
    resumed = TinyLlamaModule()
    L.seed_everything(0)
    _trainer(max_steps=20, plugins=[NF4Precision(**plugin)]).fit(
        resumed, ckpt_path=checkpoints.last_model_path or str(next(tmp_path.glob("*.ckpt")))
    )
    expected, actual = _adapter_weights(full), _adapter_weights(resumed)
    assert expected.keys() == actual.keys() and len(expected) == 28
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_fabric_plugin_converts_and_trains():
    from lightning_qlora.plugins import FabricNF4Precision

    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[FabricNF4Precision(mode="fp4", compute_dtype="fp32", adapter=LoRAConfig(r=4))],
    )
    model = fabric.setup_module(TinyLlamaModule().model)  # convert first, then build the optimizer
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(adapter_param_groups(model, lr=1e-2)))
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(layer.base.weight.quant_type == "fp4" for layer in adapter_layers(model).values())


@pytest.mark.parametrize(
    ("saved", "loading", "message"),
    [
        ("fp4", "nf4-dq", "mode: 'fp4' saved, 'nf4-dq' here.*NF4Precision\\(mode='fp4'\\).*quant=fp4"),
        ("nf4-dq", "none", "mode: 'nf4-dq' saved, 'none' here.*NF4Precision\\(mode='nf4-dq'\\)"),
        ("none", "nf4", "mode: 'none' saved, 'nf4' here.*NF4Precision\\(mode='none'\\)"),
    ],
)
def test_checkpoint_from_another_quant_mode_is_refused(tmp_path, saved, loading, message):
    from lightning_qlora.plugins import CheckpointMismatchError

    checkpoint = tmp_path / "saved.ckpt"
    first = TinyLlamaModule()
    trainer = _trainer(max_steps=2, plugins=[NF4Precision(mode=saved, compute_dtype="fp32", adapter=LoRAConfig(r=4))])
    trainer.fit(first)
    trainer.save_checkpoint(checkpoint)
    second = TinyLlamaModule()
    with pytest.raises(CheckpointMismatchError, match=message):
        _trainer(max_steps=4, plugins=[NF4Precision(mode=loading, compute_dtype="fp32", adapter=LoRAConfig(r=4))]).fit(
            second, ckpt_path=str(checkpoint)
        )
    assert second.losses == []


def test_the_float_head_multiplies_a_sliced_input_without_expanding_its_weight():
    """generate's first step hands the lm_head ``hidden[:, -1:, :]``; torch.matmul expanded the weight per row."""
    model = TinyLlamaModule().model
    apply_qlora(model, QLoRASpec(mode="nf4-dq", adapter=LoRAConfig(r=4)))
    hidden = torch.randn(6, 5, 64)[:, -1:, :]  # non-contiguous, as transformers slices it
    with torch.no_grad(), torch.profiler.profile() as profile:
        logits = model.lm_head(hidden)
    assert not any(event.name == "aten::bmm" for event in profile.events())  # one (6, 64) @ (64, 96) instead
    assert torch.equal(logits, model.lm_head(hidden.contiguous()))
    apply_qlora(model, QLoRASpec(mode="nf4-dq", adapter=None))  # converting again adds no second hook
    assert len(model.lm_head._forward_pre_hooks) == 1
