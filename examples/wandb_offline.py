"""Track a QLoRA run with Weights & Biases, offline: metrics, config, the loss-curve image, the adapter artifact.

Offline runs are written under ``<run_dir>/wandb`` and can be uploaded later with ``wandb sync``.
Run: ``python examples/wandb_offline.py [run_dir]`` (tiny in-memory Llama, seconds).
"""

from __future__ import annotations

import os
import sys
import tempfile

import lightning as L

from lightning_qlora.adapters import LoRAConfig, save_adapters
from lightning_qlora.callbacks import LossCurves
from lightning_qlora.data import InstructionDataModule, task_paths
from lightning_qlora.models.tiny import load_tiny_llama
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision


def main(run_dir: str | None = None) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    run_dir = run_dir or tempfile.mkdtemp(prefix="wandb_example_")
    L.seed_everything(0)
    model, tokenizer = load_tiny_llama()
    data = InstructionDataModule(tokenizer, **task_paths("iso_dates"), batch_size=8, max_length=384)
    logger = L.pytorch.loggers.WandbLogger(project="lightning_qlora", save_dir=run_dir, offline=True)
    logger.log_hyperparams({"adapter": "lora", "r": 8, "quant": "nf4-dq"})
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=logger,
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=5,
        callbacks=[LossCurves(dirpath=run_dir)],
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=8))],
    )
    module = QLoRAModule(model, lr=1e-3)
    trainer.fit(module, datamodule=data)
    artifact = wandb.Artifact(name="adapter", type="model")
    artifact.add_dir(str(save_adapters(module.model, os.path.join(run_dir, "adapter"))))
    logger.experiment.log_artifact(artifact)
    wandb.finish()
    print(
        f"W&B offline run written to {os.path.join(run_dir, 'wandb')}; upload with: wandb sync {run_dir}/wandb/offline-run-*"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
