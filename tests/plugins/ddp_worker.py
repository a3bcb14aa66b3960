"""One rank of the 2-process CPU DDP/FSDP tests (run by test_ddp.py with torchrun-style env vars)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
import transformers
from torch.utils.data import DataLoader, DistributedSampler

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import FSDPNF4Precision, NF4Precision
from lightning_qlora.quantization.tensor import Quantized4bitTensor
from lightning_qlora.strategies import QLoRAFSDPStrategy


class LoggedQLoRA(QLoRAModule):
    """Records the globally averaged loss of every step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.global_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.global_losses.append(self.all_gather(loss.detach()).mean().item())
        return loss


def main(
    devices: int,
    batch_per_device: int,
    out: str,
    strategy: str = "ddp",
    steps: str = "8",
    save_dir: str = "-",
    resume: str = "-",
) -> None:
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
    plugin = dict(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8))
    if devices == 1:
        strategy_object, precision = "auto", NF4Precision(**plugin)
    elif strategy == "fsdp":
        strategy_object, precision = QLoRAFSDPStrategy(), FSDPNF4Precision(**plugin)
    else:
        strategy_object, precision = "ddp", NF4Precision(**plugin)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy_object,
        max_steps=int(steps),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=save_dir != "-",
        default_root_dir=str(Path(out).parent),
        callbacks=[ModelCheckpoint(dirpath=save_dir, every_n_train_steps=4, save_top_k=-1)] if save_dir != "-" else [],
        use_distributed_sampler=False,
        plugins=[precision],
    )
    trainer.fit(module, train_dataloaders=data, ckpt_path=None if resume == "-" else resume)
    if strategy == "fsdp" and devices > 1:  # how much of the flat (float) parameter this rank holds
        flat = trainer.strategy.model._handle.flat_param
        sizes = [
            flat.numel(),
            flat._unpadded_unsharded_size.numel(),
            sum(p.numel() for p in module.parameters() if isinstance(p, Quantized4bitTensor)),
        ]
        with open(f"{out}.rank{trainer.global_rank}.sharding", "w") as handle:
            json.dump(sizes, handle)
    if trainer.global_rank == 0:
        with open(out, "w") as handle:
            json.dump(module.global_losses, handle)
    if torch.distributed.is_initialized():  # leave together: exiting with gloo threads alive can abort a rank
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:8])
