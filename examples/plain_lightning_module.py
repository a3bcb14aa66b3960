"""Your own LightningModule + ``plugins=[NF4Precision(...)]``: train, checkpoint, resume -- no hook of ours.

Delta-LoRA is used because it needs per-step work (its base moves after every optimizer step) that
the plugin runs for any module; the resumed run ends bit-identical to the uninterrupted one.

Run: ``python examples/plain_lightning_module.py`` (a tiny random Llama, under a minute on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora.adapters import DeltaLoRAConfig
from lightning_qlora.plugins import NF4Precision


class MyModule(L.LightningModule):
    """A plain module: a transformers model, its loss, AdamW over what requires grad."""

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

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        ids = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


def fit(steps: int, ckpt_dir: Path, ckpt_path: str | None = None) -> MyModule:
    L.seed_everything(0)
    module = MyModule()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_train_steps=8)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=DeltaLoRAConfig(r=4))],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        full = fit(12, Path(tmp) / "full")
        fit(8, Path(tmp) / "part")
        resumed = fit(12, Path(tmp) / "resumed", ckpt_path=str(next((Path(tmp) / "part").glob("*step=8*.ckpt"))))
    a, b = full.state_dict(), resumed.state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    print(f"12 steps straight vs 8 + resume: every tensor identical (moved 4-bit bases included): {same}")


if __name__ == "__main__":
    main()
