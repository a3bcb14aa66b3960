"""LoRA+: LoRA whose B matrix learns ``lr_ratio`` times faster (Hayou et al., https://arxiv.org/abs/2402.12354).

Same layer as LoRA; only the optimizer parameter groups differ: ``A`` at ``lr``, ``B`` at
``lr * lr_ratio`` (default 16). Works with any ``torch.optim`` optimizer.

Example:
    >>> layer = LoRAPlusConfig(r=4, lr_ratio=16).build(torch.nn.Linear(32, 32))
    >>> [g["lr"] for g in layer.param_groups(1e-4)]
    [0.0001, 0.0016]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_qlora.adapters.base import AdapterConfigError
from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer


@dataclass(frozen=True, kw_only=True)
class LoRAPlusConfig(LoRAConfig):
    """LoRA settings plus ``lr_ratio``: B's learning rate over A's."""

    lr_ratio: float = 16.0
    method: ClassVar[str] = "lora_plus"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_ratio > 0:
            raise AdapterConfigError(f"lora_plus: lr_ratio={self.lr_ratio!r} must be > 0 (the paper uses 2..32).")


class LoRAPlusLayer(LoRALayer):
    """LoRA layer whose :meth:`param_groups` puts ``lora_B`` at ``lr * lr_ratio``."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.lora_A], "lr": lr}, {"params": [self.lora_B], "lr": lr * self.config.lr_ratio}]


LoRAPlusConfig.layer_class = LoRAPlusLayer
