"""QLoRA with Lightning Fabric: your own training loop, the same plugin.

Run: ``python examples/finetune_with_fabric.py [steps]`` (tiny in-memory Llama, seconds).
"""

from __future__ import annotations

import sys

import lightning as L
import torch

from lightning_qlora.adapters import DoRAConfig, adapter_param_groups
from lightning_qlora.data import InstructionDataModule, task_paths
from lightning_qlora.models.tiny import load_tiny_llama
from lightning_qlora.plugins import FabricNF4Precision


def main(steps: int = 20) -> None:
    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[FabricNF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=DoRAConfig(r=8, alpha=16))],
    )
    fabric.seed_everything(0)
    model, tokenizer = load_tiny_llama()
    model = fabric.setup_module(model.train())  # the plugin quantizes and injects adapters here
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(adapter_param_groups(model, lr=2e-3)))
    data = InstructionDataModule(tokenizer, **task_paths("iso_dates"), batch_size=8, max_length=384)
    data.setup("fit")
    loader = fabric.setup_dataloaders(data.train_dataloader())
    losses = []
    for step, batch in zip(range(steps), loader):
        loss = model(**batch).loss
        fabric.backward(loss)  # the plugin adds the adapters' extra loss (AdaLoRA, mixtures) here
        optimizer.step()  # ... and runs their per-step work (Delta-LoRA) after this
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 5 == 0:
            fabric.print(f"step {step}: loss {loss.item():.4f}")
    fabric.print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
