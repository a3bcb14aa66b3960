"""``load_causal_lm`` on the five families: the same model transformers loads, then exactly the plugin's 4 bits.

Pinned to transformers (``AutoModelForCausalLM.from_pretrained``) and to the existing conversion
path (``quantize_linears`` on that float model, itself bit-exact with bitsandbytes): the
streamed model must hold the same 4-bit codes and give the same logits. Its distance to the
float model is then bounded by NF4's own error, measured on the float model (see
``test_logits_within_nf4_error_of_the_float_model``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn

from lightning_qlora.models import load_causal_lm
from lightning_qlora.quantization import Linear4bit, Quantized4bitTensor
from lightning_qlora.quantization.convert import quantize_linears
from tests.models.checkpoints import FAMILIES


def _tokens(seed: int = 0, shape: tuple[int, int] = (4, 32)) -> torch.Tensor:
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


def _reference(directory) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_float_load_equals_transformers(family, tiny_checkpoints):
    ours, tokenizer = load_causal_lm(tiny_checkpoints[family], mode="none", compute_dtype="fp32")
    theirs = _reference(tiny_checkpoints[family])
    assert type(ours) is type(theirs) and not ours.training
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    assert torch.equal(_logits(ours, _tokens()), _logits(theirs, _tokens()))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_load_is_the_plugins_conversion_of_the_transformers_model(family, tiny_checkpoints):
    ours, _ = load_causal_lm(tiny_checkpoints[family], mode="nf4-dq", compute_dtype="fp32")
    theirs = _reference(tiny_checkpoints[family])
    converted = quantize_linears(theirs, "nf4", 64, True, skip=("lm_head",))
    quantized = {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    suffixes = {name.rsplit(".", 1)[-1] for name in quantized}
    assert quantized == set(converted) and len(quantized) == 2 * len(suffixes)  # 2 layers
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert suffixes == ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "phi3" else expected)
    for name in quantized:
        mine, ref = ours.get_submodule(name), theirs.get_submodule(name)
        assert isinstance(mine.weight, Quantized4bitTensor) and not mine.weight.requires_grad
        assert torch.equal(mine.weight.packed, ref.weight.packed)
        assert torch.equal(mine.weight.nested.codes, ref.weight.nested.codes)
        assert torch.equal(mine.weight.nested.nested_absmax, ref.weight.nested.nested_absmax)
        assert (mine.bias is None) == (ref.bias is None)
        if ref.bias is not None:  # Qwen2's q/k/v biases stay float
            assert isinstance(mine.bias, nn.Parameter) and torch.equal(mine.bias, ref.bias)
    assert type(ours.lm_head) is nn.Linear  # skipped, float
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.get_input_embeddings().weight
    else:
        assert ours.lm_head.weight is not ours.get_input_embeddings().weight
    torch.testing.assert_close(_logits(ours, _tokens()), _logits(theirs, _tokens()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_within_nf4_error_of_the_float_model(family, tiny_checkpoints):
    """The bound comes from the float model itself.

    Perturb each quantized weight by its own NF4 error with the entries randomly permuted: the
    same error distribution (size, per-element spread), no structure. The logit change that
    causes is what NF4's weight error costs this model; the 4-bit model must stay within 1.5x of
    the largest of three such draws (measured ratio 0.9-1.1 across these families and seeds). A
    weight loaded into the wrong slot or a lost tie moves the logits by about their own norm
    (~48 here), far beyond the bound (~15).
    """
    ours, _ = load_causal_lm(tiny_checkpoints[family], mode="nf4-dq", compute_dtype="fp32")
    theirs = _reference(tiny_checkpoints[family])
    tokens = _tokens(1)
    exact = _logits(theirs, tokens)
    deviation = float((_logits(ours, tokens) - exact).norm())
    same_sized = []
    with torch.no_grad():
        for seed in range(3):
            generator = torch.Generator().manual_seed(100 + seed)
            noisy = copy.deepcopy(theirs)
            for name, layer in ours.named_modules():
                if isinstance(layer, Linear4bit):
                    weight = noisy.get_submodule(name).weight
                    error = (layer.weight.dequantize(torch.float32) - weight).flatten()
                    weight.add_(error[torch.randperm(error.numel(), generator=generator)].view_as(weight))
            same_sized.append(float((_logits(noisy, tokens) - exact).norm()))
    assert 0 < deviation <= 1.5 * max(same_sized), (deviation, same_sized)
    assert deviation < 0.5 * float(exact.norm())


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq"])
def test_other_modes_and_block_sizes(mode, tiny_checkpoints):
    ours, _ = load_causal_lm(tiny_checkpoints["llama"], mode=mode, blocksize=128, compute_dtype="fp32")
    theirs = _reference(tiny_checkpoints["llama"])
    quant_type, double_quant = mode.removesuffix("-dq"), mode.endswith("-dq")
    quantize_linears(theirs, quant_type, 128, double_quant)
    layer, ref = ours.model.layers[1].mlp.down_proj, theirs.model.layers[1].mlp.down_proj
    weight = layer.weight
    assert (weight.quant_type, weight.blocksize, weight.double_quantized) == (quant_type, 128, double_quant)
    assert torch.equal(layer.weight.packed, ref.weight.packed)
    torch.testing.assert_close(_logits(ours, _tokens()), _logits(theirs, _tokens()), rtol=0, atol=1e-5)


def test_compute_dtype_and_skip_modules(tiny_checkpoints):
    ours, _ = load_causal_lm(tiny_checkpoints["qwen2"], compute_dtype="bf16", skip_modules=("lm_head", "down_proj"))
    assert ours.get_input_embeddings().weight.dtype == torch.bfloat16
    assert ours.model.norm.weight.dtype == torch.bfloat16
    assert ours.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the 4-bit weight's float dtype
    assert type(ours.model.layers[0].mlp.down_proj) is nn.Linear
    assert ours.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert ours(input_ids=_tokens()).logits.dtype == torch.bfloat16


def test_a_tied_output_layer_that_is_not_skipped_is_quantized_from_the_embedding(tiny_checkpoints):
    ours, _ = load_causal_lm(tiny_checkpoints["gemma2"], compute_dtype="fp32", skip_modules=())
    theirs = _reference(tiny_checkpoints["gemma2"])
    quantize_linears(theirs, skip=())
    assert isinstance(ours.lm_head, Linear4bit)
    assert torch.equal(ours.lm_head.weight.packed, theirs.lm_head.weight.packed)
    assert type(ours.get_input_embeddings().weight) is nn.Parameter  # the embedding itself stays float
    torch.testing.assert_close(_logits(ours, _tokens()), _logits(theirs, _tokens()), rtol=0, atol=1e-5)


def test_a_base_model_checkpoint_loads_through_the_prefix_rename(tiny_checkpoints, tmp_path):
    """Keys saved from ``Qwen2Model`` lack ``model.``; transformers' renaming adds it (tied head: nothing missing)."""
    theirs = _reference(tiny_checkpoints["qwen2"])
    theirs.model.save_pretrained(tmp_path, max_shard_size="60KB")
    keys = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "embed_tokens.weight" in keys and not any(k.startswith("model.") for k in keys)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_checkpoints["qwen2"] / name).is_file():
            (tmp_path / name).write_bytes((tiny_checkpoints["qwen2"] / name).read_bytes())
    ours, _ = load_causal_lm(tmp_path, mode="none", compute_dtype="fp32")
    assert type(ours).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(_logits(ours, _tokens()), _logits(theirs, _tokens()))
