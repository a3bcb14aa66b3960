"""The serving engine decoding on cuda gives the merged float model's greedy tokens.

The oracle is the CPU test's: each request alone, greedy, on a float Llama holding the dequantized
base with its adapter merged in (run on the CPU, where the CPU tests pin it). The engine runs the
4-bit model moved to the GPU, mixing the base and four adapters in one batch. Logits are held to
the CPU test's tolerance (float32 re-association only; TF32 matmuls are off by torch's default).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_qlora.adapters import export_peft, save_adapters
from lightning_qlora.models.tiny import load_tiny_llama
from lightning_qlora.quantization.convert import quantize_linears
from lightning_qlora.serving import GenerationEngine, SamplingParams
from tests.serving.conftest import ADAPTERS, adapted_copy, float_reference
from tests.serving.test_engine import LOGIT_ATOL, PROMPTS, greedy_reference

from .marks import CUDA_ONLY

pytestmark = CUDA_ONLY

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(4-bit model on cuda, tokenizer, adapters dir, {name: CPU float reference})``."""
    model, tokenizer = load_tiny_llama(hidden_size=64, num_layers=2, seed=0)
    config = copy.deepcopy(model.config)
    quantize_linears(model, "nf4", 64, double_quant=True)
    root = tmp_path_factory.mktemp("cuda-adapters")
    references = {"base": float_reference(model, config)}
    for seed, (name, (rank, alpha, targets, fmt)) in enumerate(ADAPTERS.items()):
        adapted = adapted_copy(model, rank, alpha, targets, seed)
        (save_adapters if fmt == "ours" else export_peft)(adapted, root / name)
        references[name] = float_reference(adapted, config)
    return model.to("cuda"), tokenizer, root, references


def test_mixed_batch_decoding_on_cuda_equals_the_merged_float_models(served):
    model, tokenizer, root, references = served
    engine = GenerationEngine(model, tokenizer, adapters_dir=root, num_pages=2048, record_logits=True)
    names = ["base", *ADAPTERS]
    submitted = []
    for i in range(10):
        name, prompt = names[i % len(names)], PROMPTS[i % len(PROMPTS)]
        submitted.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_tokens=MAX_TOKENS))))
    engine.run_until_idle()
    assert all(handle.done.is_set() for _, _, handle in submitted)
    assert not engine.finish_reasons.get("error"), engine.finish_reasons  # a failed step finishes its requests
    finished = {id(r.handle): r for r in engine.finished}
    for name, prompt, handle in submitted:
        request = finished[id(handle)]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        tokens, logits = greedy_reference(references[name], ids, MAX_TOKENS, tokenizer.eos_token_id)
        assert request.generated == tokens, (name, prompt)
        assert len(request.logits) == len(logits)
        for got, expected in zip(request.logits, logits, strict=True):
            assert got.is_cuda  # the step really ran on the GPU
            torch.testing.assert_close(got.cpu(), expected, atol=LOGIT_ATOL, rtol=0)
