"""The "paged" strategy: same training as unpaged AdamW, resume, NF4Precision, early setup errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader, TensorDataset

import lightning_qlora.strategies  # noqa: F401 -- registers "paged"
from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.module import QLoRAModule
from lightning_qlora.optim import PagedAdamW, PagedAdamW8bit, PagedState, PageStoreSetupError, UnsupportedOptimizerError
from lightning_qlora.plugins import NF4Precision
from lightning_qlora.strategies import PagedDDPStrategy, PagedStrategy


class Regression(L.LightningModule):
    """Two layers in two param groups (different lr) with a StepLR schedule."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        groups = [{"params": self.net[0].parameters(), "lr": 1e-2}, {"params": self.net[2].parameters(), "lr": 3e-2}]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(groups)
        optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}


def _data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(48, 32, generator=generator), torch.randn(48, 1, generator=generator)), batch_size=8
    )


def _trainer(strategy, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    return L.Trainer(strategy=strategy, **{**options, **kwargs})


def _fit(strategy, module: L.LightningModule | None = None, **kwargs) -> tuple[L.Trainer, L.LightningModule]:
    torch.manual_seed(0)
    module = module or Regression()
    trainer = _trainer(strategy, **kwargs)
    trainer.fit(module, _data())
    return trainer, module


def test_registered_names():
    assert "paged" in StrategyRegistry and "paged_ddp" in StrategyRegistry
    assert isinstance(_trainer("paged").strategy, PagedStrategy)
    assert isinstance(StrategyRegistry.get("paged_ddp"), PagedDDPStrategy)


@pytest.mark.parametrize("strategy", ["paged", "mmap"])
def test_training_equals_unpaged_adamw_with_groups_and_scheduler(tmp_path, strategy):
    if strategy == "mmap":
        strategy = PagedStrategy(store="mmap", budget_bytes=1 << 20, page_dir=tmp_path)
    _, reference = _fit("auto")
    trainer, paged = _fit(strategy)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, PagedAdamW)
    assert [group["lr"] for group in optimizer.param_groups] == [0.005, 0.015]  # StepLR reached it
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    # Lightning moved the optimizer state on setup: it is still pages, not tensors
    assert all(isinstance(state["paged"], PagedState) for state in optimizer.state.values())
    for expected, actual in zip(reference.parameters(), paged.parameters(), strict=True):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_resume_from_checkpoint_gives_the_same_next_steps(tmp_path, optim_bits):
    def strategy(name: str) -> PagedStrategy:
        return PagedStrategy(
            store="mmap", budget_bytes=1 << 20, page_dir=tmp_path / name, optim_bits=optim_bits, page_elements=4096
        )

    trainer, _ = _fit(strategy("first"), max_epochs=1)
    checkpoint = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(checkpoint)
    _, straight = _fit(strategy("straight"), max_epochs=2)
    resumed_module = Regression()
    resumed_trainer = _trainer(strategy("resumed"), max_epochs=2)
    resumed_trainer.fit(resumed_module, _data(), ckpt_path=checkpoint)
    optimizer = resumed_trainer.optimizers[0]
    assert isinstance(optimizer, PagedAdamW8bit if optim_bits == 8 else PagedAdamW)
    assert all(isinstance(state["paged"], PagedState) for state in optimizer.state.values())
    for expected, actual in zip(straight.parameters(), resumed_module.parameters(), strict=True):
        assert torch.equal(expected, actual)


def test_unsupported_optimizer_fails_at_setup_listing_supported_ones():
    with pytest.raises(UnsupportedOptimizerError, match="Supported optimizers: torch.optim.AdamW"):
        _fit("paged", Regression("sgd"))


def test_unwritable_page_dir_fails_at_setup_before_any_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    module = Regression()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(PagedStrategy(store="mmap", budget_bytes=1 << 20, page_dir=blocker / "pages"))
    with pytest.raises(PageStoreSetupError, match="page directory"):
        trainer.fit(module, _data())
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


class _LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _qlora_losses(strategy) -> list[float]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    module = QLoRAModule(transformers.LlamaForCausalLM(config), lr=1e-2)
    ids = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(0))
    log = _LossLog()
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[log],
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8))],
    )
    trainer.fit(module, DataLoader([{"input_ids": row} for row in ids], batch_size=4))
    return log.losses


def test_works_with_nf4_precision(tmp_path):
    reference = _qlora_losses("auto")
    paged = _qlora_losses(PagedStrategy(store="mmap", budget_bytes=1 << 20, page_dir=tmp_path))
    assert len(paged) == 4 and paged == reference  # same bits: PagedAdamW is AdamW's arithmetic
    assert paged[-1] < paged[0]
