"""DoRA: weight-decomposed low-rank adaptation (Liu et al., https://arxiv.org/abs/2402.09353).

``W' = m * (W0 + s B A) / ||W0 + s B A||`` with the norm taken per output row (a column of
``W^T``) and treated as a constant in the backward pass (as the paper and PEFT do), and a
trainable magnitude ``m (out,)`` initialized to ``||W0||``. Computed without materializing
``W'`` in the forward:

    h = m / n * (W0 x + s B A x) + bias,   n = ||W0 + s B A||_row (detached)

On a 4-bit base the norm uses the dequantized weight, which is freed right away.
Trainable parameters: ``r * (in + out) + out``.

Outside training (``eval()`` or ``torch.no_grad()``) the norm is cached, as PEFT does at
inference: generation would otherwise dequantize every base weight once per token. The cache is
keyed on the identity, storage and version counter of ``lora_A``, ``lora_B`` and the base weight
(every optimizer step, ``load_state_dict`` or in-place edit bumps a version) and on the scaling,
so it never serves a norm of other weights; a training forward recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfig, CapabilityError, LoRAFactors, PeftState, base_weight
from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer
from lightning_qlora.quantization.tensor import Quantized4bitTensor


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(LoRAConfig):
    """LoRA settings; the magnitude vector is added automatically."""

    method: ClassVar[str] = "dora"

    def lora_factors_from_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAFactors:
        return AdapterConfig.lora_factors_from_state(self, name, tensors)  # refuse: the magnitude rescales the base


class DoRALayer(LoRALayer):
    """LoRA layer with a magnitude vector ``lora_magnitude (out,)``."""

    def __init__(self, base: nn.Module, config: DoRAConfig) -> None:
        super().__init__(base, config)
        with torch.no_grad():
            self.lora_magnitude = nn.Parameter(self._weight_norm())
        self._norm_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def _weight_norm(self) -> torch.Tensor:
        weight = base_weight(self.base) + self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return torch.linalg.norm(weight, dim=1)

    def _norm_key(self) -> tuple[Any, ...]:
        weight = self.base.weight
        stored = weight.packed if isinstance(weight, Quantized4bitTensor) else weight  # a 4-bit weight's storage
        tensors = (self.lora_A, self.lora_B, weight, stored)
        return (
            self.scaling,
            *((id(t), t._version) for t in tensors),
            *(t.data_ptr() for t in tensors[:2] + tensors[3:]),
        )

    def _cached_weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_row``, detached; cached outside training (see the module docstring)."""
        if self.training and torch.is_grad_enabled():
            self._norm_cache = None
            return self._weight_norm().detach()
        key = self._norm_key()
        cache = getattr(self, "_norm_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._norm_cache = (key, self._weight_norm())
        return cache[1]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        scale = (self.lora_magnitude / self._cached_weight_norm()).to(x.dtype)
        bias = self.base.bias
        without_bias = base_out - bias if bias is not None else base_out
        # super().delta is LoRA's scaled update s B A dropout(x), through its fused op
        return (scale - 1) * without_bias + scale * super().delta(x, base_out)

    def delta_weight(self) -> torch.Tensor:
        weight = base_weight(self.base) + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        merged = (self.lora_magnitude.float() / torch.linalg.norm(weight, dim=1)).unsqueeze(1) * weight
        return merged - base_weight(self.base)

    def peft_config(self) -> dict[str, Any]:
        return {**super().peft_config(), "use_dora": True}

    def peft_state(self, name: str) -> PeftState:
        state = super().peft_state(name)
        state.tensors["lora_magnitude_vector"] = self.lora_magnitude.detach().contiguous()
        return state

    def lora_factors(self) -> LoRAFactors:
        raise CapabilityError(
            "'dora' adapters rescale every row of the base weight, so they are not a scale * B A update and cannot "
            "be served as LoRA factors; merge them (lightning_qlora.adapters.export_merged) to serve the result."
        )


DoRAConfig.layer_class = DoRALayer
