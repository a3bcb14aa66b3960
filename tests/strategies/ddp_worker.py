"""One rank of the 2-process paged DDP test (run by test_paged_ddp.py with torchrun-style env vars)."""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader, DistributedSampler

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.optim import PagedAdamW, PagedState
from lightning_qlora.plugins import NF4Precision
from lightning_qlora.strategies import PagedDDPStrategy
from tests.plugins.ddp_worker import LoggedQLoRA  # PYTHONPATH is the repo root (see test_paged_ddp.py)


def main(devices: int, batch_per_device: int, out: str) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    module = LoggedQLoRA(transformers.LlamaForCausalLM(config), lr=1e-2)
    ids = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row} for row in ids]
    # rank r takes rows r, r+2, ...: its batch k and the other rank's make up exactly the
    # single process's batch k of 4 rows, so the global batches are the same
    sampler = DistributedSampler(rows, num_replicas=devices, rank=int(os.environ.get("RANK", 0)), shuffle=False)
    data = DataLoader(rows, batch_size=batch_per_device, sampler=sampler)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=PagedDDPStrategy(store="mmap", budget_bytes=1 << 20) if devices > 1 else "auto",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8))],
    )
    trainer.fit(module, train_dataloaders=data)
    if devices > 1:  # every rank trained with its own paged state, within the budget
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, PagedAdamW), type(optimizer)
        assert all(isinstance(s["paged"], PagedState) for s in optimizer.state.values())
        assert 0 < optimizer.store.peak_resident_bytes <= 1 << 20
    if trainer.global_rank == 0:
        with open(out, "w") as handle:
            json.dump(module.global_losses, handle)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
