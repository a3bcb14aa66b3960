"""Fixtures: a 4-bit tiny Llama, adapters of several ranks saved in our format and PEFT's, and
float reference models (dequantized base + merged adapter) to compare the engine with."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightning_qlora.adapters import LoRAConfig, export_peft, inject_adapters, merged_state_dict, save_adapters
from lightning_qlora.models.tiny import load_tiny_llama
from lightning_qlora.quantization.convert import quantize_linears

#: name -> (rank, alpha, targets, format)
ADAPTERS: dict[str, tuple[int, float, object, str]] = {
    "r2-qv": (2, 4.0, ["q_proj", "v_proj"], "ours"),
    "r4-all": (4, 8.0, "all-linear", "ours"),
    "r8-mlp": (8, 8.0, ["gate_proj", "up_proj", "down_proj"], "peft"),
    "r16-attn": (16, 32.0, ["q_proj", "k_proj", "v_proj", "o_proj"], "peft"),
}


def adapted_copy(quantized: torch.nn.Module, rank: int, alpha: float, targets: object, seed: int) -> torch.nn.Module:
    """A copy of the 4-bit model with a LoRA of random (non-zero) factors."""
    model = copy.deepcopy(quantized)
    inject_adapters(model, LoRAConfig(r=rank, alpha=alpha), targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # B is zero at init; random factors make every adapter matter
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def float_reference(adapted: torch.nn.Module, config: object) -> torch.nn.Module:
    """A float Llama with the dequantized base and the adapter merged in (the acceptance oracle)."""
    import transformers

    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict(merged_state_dict(adapted), strict=True)
    return reference


@pytest.fixture(scope="session")
def tiny_quantized():
    model, tokenizer = load_tiny_llama(hidden_size=64, num_layers=2, seed=0)
    config = copy.deepcopy(model.config)
    quantize_linears(model, "nf4", 64, double_quant=True)
    return model, tokenizer, config


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny_quantized) -> Path:
    model, _, _ = tiny_quantized
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, (rank, alpha, targets, fmt)) in enumerate(ADAPTERS.items()):
        adapted = adapted_copy(model, rank, alpha, targets, seed)
        (save_adapters if fmt == "ours" else export_peft)(adapted, root / name)
    return root


@pytest.fixture(scope="session")
def references(tiny_quantized) -> dict[str, torch.nn.Module]:
    """``name -> float reference model`` for every adapter and for ``"base"``."""
    model, _, config = tiny_quantized
    out = {"base": float_reference(model, config)}
    for seed, (name, (rank, alpha, targets, _)) in enumerate(ADAPTERS.items()):
        out[name] = float_reference(adapted_copy(model, rank, alpha, targets, seed), config)
    return out
