"""A tiny transformers Llama wrapped in QLoRAModule, with its own deterministic data."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora.module import QLoRAModule


class TinyLlamaQLoRA(QLoRAModule):
    def __init__(self, lr: float = 1e-2) -> None:
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        super().__init__(transformers.LlamaForCausalLM(config), lr=lr)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self):
        ids = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(0))
        return DataLoader(
            TensorDataset(ids), batch_size=4, collate_fn=lambda rows: {"input_ids": torch.stack([r[0] for r in rows])}
        )


def trainer(**kwargs) -> L.Trainer:
    kwargs = {"max_steps": 30, "enable_checkpointing": False, "logger": False, **kwargs}
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k or k.endswith("rank_mask")}
