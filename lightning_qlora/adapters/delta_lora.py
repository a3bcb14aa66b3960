"""Delta-LoRA: the frozen base also moves by the change of the low-rank product (Zi et al., https://arxiv.org/abs/2309.02411).

After every optimizer step ``t``, ``W_{t+1} = W_t + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)``
(``s`` the LoRA scaling), with no gradient or optimizer state for ``W``.

The updates telescope: after any number of steps the base has moved by
``lambda * s * (B A - B_ref A_ref)``, where ``B_ref A_ref`` is the product at the last
fold. We keep exactly that factored form (two rank-r matrices, no dense buffer):

* float base: folded into ``W`` after every step -- exact Delta-LoRA;
* 4-bit base: a tiny update per step would round away if requantized each time, so it is
  accumulated and folded every ``fold_every`` steps by dequantize -> add -> requantize with
  **stochastic rounding**, which is unbiased: the expected folded weight equals the exact
  one (with double quantization, up to the ~1/256 relative error of the 8-bit absmax).
  Between folds the forward adds the pending ``lambda s (B A - B_ref A_ref) x`` (detached),
  so the model always computes with the current weight.

The per-step work is the layer's ``after_optimizer_step()`` hook: the Lightning plugins
(:class:`~lightning_qlora.plugins.NF4Precision`, ``FabricNF4Precision``) run it after every
optimizer step of any LightningModule or Fabric loop; without Lightning call
:func:`~lightning_qlora.adapters.after_optimizer_step` after each ``optimizer.step()``.

PEFT has no Delta-LoRA: exporting to PEFT's layout is refused (A and B alone would not
reproduce a model whose base moved); :func:`~lightning_qlora.adapters.export_merged` ships it.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import CapabilityError, LoRAFactors, PeftState, base_weight, check_positive_int
from lightning_qlora.adapters.inject import after_optimizer_step
from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer
from lightning_qlora.quantization.tensor import Quantized4bitTensor, quantize_4bit


@dataclass(frozen=True, kw_only=True)
class DeltaLoRAConfig(LoRAConfig):
    """LoRA settings plus the base update.

    Attributes:
        delta_scale: ``lambda``, how far the base follows the adapter's change (paper: 2).
        fold_every: steps between folds into a 4-bit base (float bases fold every step).
        seed: seed of the stochastic rounding stream (offset by the fold count).
    """

    delta_scale: float = 2.0
    fold_every: int = 8
    seed: int = 0
    method: ClassVar[str] = "delta_lora"

    def lora_factors_from_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAFactors:
        raise CapabilityError(
            "Delta-LoRA moved its base weight, so its A/B cannot be served over the original base; merge it "
            "(lightning_qlora.adapters.export_merged) and serve that model."
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.method, "fold_every", self.fold_every)


class DeltaLoRALayer(LoRALayer):
    """LoRA layer that also updates its base weight (see the module docstring)."""

    def __init__(self, base: nn.Module, config: DeltaLoRAConfig) -> None:
        super().__init__(base, config)
        self.register_buffer("ref_A", self.lora_A.detach().clone())
        self.register_buffer("ref_B", self.lora_B.detach().clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("folds", torch.zeros((), dtype=torch.int64))

    def pending_weight(self) -> torch.Tensor:
        """Float ``(out, in)`` update not yet folded into the base."""
        current = self.lora_B.detach().float() @ self.lora_A.detach().float()
        return self.config.delta_scale * self.scaling * (current - self.ref_B.float() @ self.ref_A.float())

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        out = super().delta(x, base_out)
        if isinstance(self.base.weight, Quantized4bitTensor):
            a, b = self.lora_A.detach().to(x.dtype), self.lora_B.detach().to(x.dtype)
            lam = self.config.delta_scale * self.scaling
            pending = lam * (
                torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
                - torch.nn.functional.linear(
                    torch.nn.functional.linear(x, self.ref_A.to(x.dtype)), self.ref_B.to(x.dtype)
                )
            )
            out = out + pending
        return out

    def delta_weight(self) -> torch.Tensor:
        pending = self.pending_weight() if isinstance(self.base.weight, Quantized4bitTensor) else 0.0
        return super().delta_weight() + pending

    @torch.no_grad()
    def after_optimizer_step(self) -> bool:
        """Account one optimizer step; fold into the base when due. Returns whether it folded."""
        self.steps += 1
        weight = self.base.weight
        if not isinstance(weight, Quantized4bitTensor):
            weight.add_(self.pending_weight().to(weight.dtype))
        elif int(self.steps) % self.config.fold_every == 0:
            target = base_weight(self.base) + self.pending_weight()
            seed = self.config.seed + int(self.folds)
            folded = quantize_4bit(
                target.to(weight.dtype),
                weight.quant_type,
                weight.blocksize,
                double_quant=weight.double_quantized,
                seed=seed,
            )
            self.base.weight = nn.Parameter(folded, requires_grad=False)
            self.folds += 1
        else:
            return False
        self.ref_A.copy_(self.lora_A)
        self.ref_B.copy_(self.lora_B)
        return True

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        # the base moved: it belongs to the adapter (4-bit bases in bitsandbytes' keys)
        return {k: v for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}

    def peft_state(self, name: str) -> PeftState:
        raise CapabilityError(
            f"layer {name!r} is Delta-LoRA, which also moved its base weight; PEFT has no such method and its A/B alone "
            "would not reproduce the model. Ship it with lightning_qlora.adapters.export_merged(model, path) (a float "
            "model with everything folded in) or save_adapters(model, dir) (our format, base included)."
        )

    def lora_factors(self) -> LoRAFactors:
        raise CapabilityError(
            "Delta-LoRA moved its base weight, so its A/B cannot be served over the original base; merge it "
            "(lightning_qlora.adapters.export_merged) and serve that model."
        )


DeltaLoRAConfig.layer_class = DeltaLoRALayer


def delta_lora_step(model: nn.Module) -> int:
    """Deprecated name of :func:`~lightning_qlora.adapters.after_optimizer_step` (runs every layer's per-step work)."""
    return after_optimizer_step(model)
