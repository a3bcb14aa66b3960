"""AdaLoRA's rank budget and LoRA-drop's layer selection as Lightning callbacks, on NF4.

A tiny Llama (built here, random weights) is fine-tuned on random token data with a stock
``lightning.Trainer``; the callbacks drive everything that changes during training, so
nothing has to be called by hand. Writes the AdaLoRA rank heatmap or the LoRA-drop
importance bar chart (PNG) to the run directory.

Run: ``python examples/callbacks_adalora_and_lora_drop.py [adalora|lora_drop] [run_dir]``
"""

from __future__ import annotations

import sys
import tempfile

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader

from lightning_qlora.adapters import AdaLoRAConfig, LoRADropConfig
from lightning_qlora.callbacks import AdaLoRABudget, AdapterSummary, LoRADrop
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision


def main(method: str = "adalora", run_dir: str | None = None) -> None:
    run_dir = run_dir or tempfile.mkdtemp(prefix="lightning_qlora_callbacks_")
    L.seed_everything(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    module = QLoRAModule(transformers.LlamaForCausalLM(config), lr=1e-2)
    tokens = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(tokens, batch_size=8, shuffle=True, collate_fn=lambda rows: {"input_ids": torch.stack(rows)})
    if method == "adalora":
        adapter = AdaLoRAConfig(r=8, alpha=16)
        callback = AdaLoRABudget(target_rank=3, init_warmup=8, final_warmup=8, mask_interval=4)
    elif method == "lora_drop":
        adapter = LoRADropConfig(r=8, alpha=16)
        callback = LoRADrop(stage1_steps=15, threshold=0.9)
    else:
        raise SystemExit(f"unknown method {method!r}: use adalora or lora_drop")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=40,
        default_root_dir=run_dir,
        enable_model_summary=False,
        logger=L.pytorch.loggers.CSVLogger(run_dir),
        enable_checkpointing=False,
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=adapter)],
        callbacks=[AdapterSummary(max_rows=5), callback],
    )
    trainer.fit(module, train_dataloaders=loader)
    if method == "adalora":
        ranks = callback.ranks()
        print(
            f"final ranks: total {sum(ranks.values())} (budget {callback.target_budget}), per layer {sorted(ranks.values())}"
        )
    else:
        print(
            f"kept {len(callback.kept)} of {len(callback.importances)} layers; trainable parameters "
            f"{callback.trainable_before:,} -> {callback.trainable_after:,}"
        )
    print(f"plots and metrics in {trainer.log_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
