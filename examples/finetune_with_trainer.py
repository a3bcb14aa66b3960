"""QLoRA fine-tuning with a stock ``lightning.Trainer`` and no Hydra: plugin, data, evaluation, saving.

Run: ``python examples/finetune_with_trainer.py [tiny|smollm2] [steps]``
(``tiny``: an in-memory tiny Llama, seconds; ``smollm2``: SmolLM2-135M-Instruct, a few minutes).
"""

from __future__ import annotations

import sys
import tempfile

import lightning as L

from lightning_qlora.adapters import LoRAConfig, save_adapters
from lightning_qlora.callbacks import AdapterSummary
from lightning_qlora.data import InstructionDataModule, evaluate_instruction_model, task_paths
from lightning_qlora.models import load_smollm2
from lightning_qlora.models.tiny import load_tiny_llama
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision


def main(model_name: str = "tiny", steps: int = 20) -> None:
    L.seed_everything(0)
    model, tokenizer = load_smollm2() if model_name == "smollm2" else load_tiny_llama()
    data = InstructionDataModule(tokenizer, **task_paths("iso_dates"), batch_size=8, max_length=384)
    data.setup("test")
    test = data.examples["test"][:16]
    module = QLoRAModule(model, lr=1e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=2,
        val_check_interval=10,
        callbacks=[AdapterSummary(max_rows=4)],
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=8, alpha=16))],
    )
    trainer.fit(module, datamodule=data)
    metrics = evaluate_instruction_model(module.model, tokenizer, test, batch_size=16, max_new_tokens=12)
    directory = save_adapters(module.model, tempfile.mkdtemp(prefix="adapter_"))
    print(
        f"after {trainer.global_step} steps: test exact match {metrics['exact_match']:.3f}, answer loss "
        f"{metrics['loss']:.4f}; adapter saved to {directory}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 20)
