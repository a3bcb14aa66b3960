"""LoRADrop: selection from planted importances, parameter count, stage switch, resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora.adapters import AdaLoRAConfig, LoRADropConfig, LoRADropLayer, adapter_layers, adapter_param_groups
from lightning_qlora.adapters.io import load_adapters, save_adapters
from lightning_qlora.callbacks import CallbackConfigError, LoRADrop, select_layers
from lightning_qlora.plugins import NF4Precision, convert_before_checkpoint_restore
from tests.callbacks.tiny import trainer

#: input scale of each branch: the first two dominate the output update, so they matter
SCALES = {"a0": 3.0, "a1": 3.0, "a2": 0.1, "a3": 0.1, "b0": 0.1, "b1": 0.1}


class Branches(nn.Module):
    """``y = sum_i a_i(s_i x)`` (8 -> 8) and ``z = sum_j b_j(s_j x)`` (8 -> 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({name: nn.Linear(8, 8 if name.startswith("a") else 6) for name in SCALES})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = {name: layer(x * SCALES[name]) for name, layer in self.branches.items()}
        return sum(v for k, v in outs.items() if k.startswith("a")), sum(
            v for k, v in outs.items() if k.startswith("b")
        )


class BranchModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Branches()
        self.teacher = [torch.randn(8, 8) * 0.5, torch.randn(6, 8) * 0.5]
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        y, z = self.net(x)
        loss = (y - x @ self.teacher[0].T).square().mean() + (z - x @ self.teacher[1].T).square().mean()
        self.losses.append(loss.item())
        return loss

    def on_load_checkpoint(self, checkpoint):
        convert_before_checkpoint_restore(self, checkpoint)

    def configure_optimizers(self):
        return torch.optim.AdamW(adapter_param_groups(self, lr=2e-2))

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(1))), batch_size=8)


def _plugin(r: int = 2) -> NF4Precision:
    return NF4Precision(mode="nf4", compute_dtype="fp32", adapter=LoRADropConfig(r=r, alpha=2 * r), skip_modules=())


def _fit(max_steps: int = 40, ckpt_path: str | None = None, callbacks=(), **kwargs) -> tuple[BranchModule, LoRADrop]:
    module, drop = BranchModule(), LoRADrop(stage1_steps=16, threshold=0.9, plot=False)
    L.seed_everything(0)
    trainer(max_steps=max_steps, plugins=[_plugin()], callbacks=[drop, *callbacks], **kwargs).fit(
        module, ckpt_path=ckpt_path
    )
    return module, drop


def test_selection_rule_hand_computed():
    importances = {"x": 5.0, "y": 3.0, "z": 1.5, "w": 0.5}  # shares 0.5, 0.3, 0.15, 0.05
    assert select_layers(importances, threshold=0.5) == ["x"]
    assert select_layers(importances, threshold=0.8) == ["x", "y"]
    assert select_layers(importances, threshold=0.9) == ["x", "y", "z"]
    assert select_layers(importances, threshold=1.0) == ["x", "y", "z", "w"]
    assert select_layers(importances, top_n=2) == ["x", "y"]
    with pytest.raises(CallbackConfigError, match="importance is 0"):
        select_layers({"x": 0.0})


def test_planted_importances_select_exactly_the_dominant_layers(tmp_path):
    module, drop = _fit(default_root_dir=tmp_path)
    assert sorted(drop.kept) == ["net.branches.a0", "net.branches.a1"]
    assert sorted(drop.dropped) == ["net.branches.a2", "net.branches.a3", "net.branches.b0", "net.branches.b1"]
    r = 2
    assert drop.trainable_before == 4 * r * (8 + 8) + 2 * r * (8 + 6)
    # closed form after stage 2: the kept layers plus one shared adapter per dropped shape (8x8, 8x6)
    assert drop.trainable_after == 2 * r * (8 + 8) + r * (8 + 8) + r * (8 + 6) == 124
    optimized = sum(p.numel() for group in module.trainer.optimizers[0].param_groups for p in group["params"])
    assert optimized == 124
    layers = adapter_layers(module)
    assert layers["net.branches.a2"].shared is layers["net.branches.a3"].shared is not None
    assert layers["net.branches.b0"].shared is layers["net.branches.b1"].shared is not layers["net.branches.a2"].shared
    after_switch = module.losses[16:]
    assert sum(after_switch[-5:]) < 0.8 * sum(after_switch[:5])  # loss keeps dropping after the switch


def test_importance_plot_and_logged_saving(tmp_path):
    module, drop = BranchModule(), LoRADrop(stage1_steps=4, top_n=3)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer(max_steps=6, plugins=[_plugin()], callbacks=[drop], logger=logger).fit(module)
    assert len(drop.kept) == 3
    assert (tmp_path / "lightning_logs/version_0/lora_drop_importance.png").read_bytes()[:4] == b"\x89PNG"
    assert "lora_drop/param_saving" in (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()


def test_resume_after_the_switch_matches_the_uninterrupted_run(tmp_path):
    full, _ = _fit()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=24)
    _fit(max_steps=24, callbacks=[checkpoint], enable_checkpointing=True)
    resumed, drop = _fit(ckpt_path=str(next(tmp_path.glob("*step=24*.ckpt"))))
    assert drop.selected and sorted(drop.kept) == ["net.branches.a0", "net.branches.a1"]
    expected, actual = full.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys() and any(k.startswith("lora_drop_shared.") for k in expected)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_adapter_files_keep_the_sharing(tmp_path):
    module, drop = _fit(max_steps=20)
    save_adapters(module, tmp_path / "adapter")
    fresh = BranchModule()
    _plugin().convert_module(fresh)
    load_adapters(fresh, tmp_path / "adapter")
    layers = adapter_layers(fresh)
    assert layers["net.branches.a2"].shared is layers["net.branches.a3"].shared is not None
    x = torch.randn(4, 8)
    assert all(torch.equal(a, b) for a, b in zip(module.net(x), fresh.net(x), strict=True))


def test_misconfiguration_is_reported_before_training():
    with pytest.raises(CallbackConfigError, match="threshold=0"):
        LoRADrop(threshold=0)
    with pytest.raises(CallbackConfigError, match="threshold=1.5"):
        LoRADrop(threshold=1.5)
    with pytest.raises(CallbackConfigError, match="top_n=0"):
        LoRADrop(top_n=0)
    cases = [
        (LoRADrop(stage1_steps=4, top_n=7), _plugin(), "top_n=7 exceeds the 6"),
        (LoRADrop(stage1_steps=10), _plugin(), "stage1_steps=10 leaves no stage 2 within max_steps=10"),
        (
            LoRADrop(stage1_steps=4),
            NF4Precision(mode="nf4", compute_dtype="fp32", adapter=AdaLoRAConfig(r=2), skip_modules=()),
            "needs LoRA-drop adapters, the model has \\['adalora'\\]",
        ),
    ]
    for callback, plugin, message in cases:
        module = BranchModule()
        with pytest.raises(CallbackConfigError, match=message):
            trainer(max_steps=10, plugins=[plugin], callbacks=[callback]).fit(module)
        assert module.losses == []
    assert isinstance(LoRADropLayer, type)
