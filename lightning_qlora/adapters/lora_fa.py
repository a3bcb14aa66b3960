"""LoRA-FA: LoRA with a frozen random A (Zhang et al., https://arxiv.org/abs/2308.03303).

``A (r, in)`` is fixed after its random initialization (a random projection), only
``B (out, r)`` trains: ``r * out`` trainable parameters, and the activations kept for the
backward pass are the ``r``-dimensional ``A x`` instead of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer


@dataclass(frozen=True, kw_only=True)
class LoRAFAConfig(LoRAConfig):
    """LoRA settings; A is frozen."""

    method: ClassVar[str] = "lora_fa"


class LoRAFALayer(LoRALayer):
    """LoRA layer with ``lora_A`` frozen (still saved, since it is random)."""

    def __init__(self, base: nn.Module, config: LoRAFAConfig) -> None:
        super().__init__(base, config)
        self.lora_A.requires_grad_(False)


LoRAFAConfig.layer_class = LoRAFALayer
