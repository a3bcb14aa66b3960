"""Llama, Mistral and Qwen2 (q/k/v biases) each serve the greedy tokens of the float model with the adapter merged."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_qlora.adapters import merged_state_dict
from lightning_qlora.models.tiny import tiny_tokenizer
from lightning_qlora.quantization.convert import quantize_linears
from lightning_qlora.serving import GenerationEngine, SamplingParams
from tests.serving.conftest import adapted_copy
from tests.serving.test_engine import greedy_reference


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_family_greedy_tokens_equal_the_merged_float_model(family, tmp_path):
    import transformers

    tokenizer = tiny_tokenizer()
    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        sliding_window=8 if family == "mistral" else None,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()  # biases must matter
    quantize_linears(model, "nf4", 64, double_quant=True)
    adapted = adapted_copy(model, 4, 8.0, "all-linear", seed=3)
    from lightning_qlora.adapters import save_adapters

    save_adapters(adapted, tmp_path / "a")
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    reference.load_state_dict(merged_state_dict(adapted), strict=True)
    engine = GenerationEngine(model, tokenizer, adapters_dir=tmp_path, record_logits=True)
    prompt = "The quick brown fox"  # longer than Mistral's window of 8 with the completion
    handle = engine.submit(prompt, "a", SamplingParams(max_tokens=10))
    engine.run_until_idle()
    handle.text()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    tokens, _ = greedy_reference(reference, ids, 10, tokenizer.eos_token_id)
    assert engine.finished[0].generated == tokens
