"""The lossless merge route: a float state dict of the base with every adapter folded in.

Merging into 4-bit weights requantizes (see :meth:`AdapterLayer.merge`, which reports the
error). To ship a merged model without that loss, :func:`merged_state_dict` dequantizes each
base weight, adds the adapter's ``delta_weight()`` in float32 and casts to ``dtype``; the keys
are those of the original, un-adapted, un-quantized model, so ``load_state_dict`` of a fresh
float model (e.g. ``AutoModelForCausalLM.from_config``) takes it directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterLayer, base_weight
from lightning_qlora.atomic import atomic_save_safetensors
from lightning_qlora.quantization.linear import Linear4bit


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Float weights of ``model`` with adapters merged and 4-bit weights dequantized."""
    out: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, AdapterLayer):
            out[prefix + "weight"] = (base_weight(module.base) + module.delta_weight().float()).to(dtype)
            if module.base.bias is not None:
                out[prefix + "bias"] = module.base.bias.detach().to(dtype)
            return
        if isinstance(module, Linear4bit):
            out[prefix + "weight"] = module.weight.dequantize(dtype)
            if module.bias is not None:
                out[prefix + "bias"] = module.bias.detach().to(dtype)
            return
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name in module._non_persistent_buffers_set:
                continue
            out[prefix + name] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
        for name, child in module.named_children():
            if not getattr(
                child, "is_adapter_state", False
            ):  # adapter tensors held on the model (LoRA-drop's shared pairs)
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return out


def export_merged(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write :func:`merged_state_dict` to a safetensors file (tied weights saved once each)."""
    tensors = {k: v.contiguous().clone() for k, v in merged_state_dict(model, dtype).items()}
    return atomic_save_safetensors(tensors, Path(path))
