"""Serving's lm_head in an exact compact form (int8 blocks as GGUF Q8_0 stores them, or bf16).

Oracles: ``F.linear`` with the float weight (the kernel), the weight itself (the forms must
reproduce every value), and the engine's greedy tokens and logits against transformers' forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_qlora.errors import ShapeMismatchError
from lightning_qlora.ops import op, reference
from lightning_qlora.serving import GenerationEngine, SamplingParams
from lightning_qlora.serving.lm_head import INT8_BLOCK, CompactHead, exact_bf16, exact_int8_blocks
from lightning_qlora.serving.paged_llama import PagedLlama
from lightning_qlora.serving.pool import PagePool
from tests.serving.conftest import float_reference
from tests.serving.test_engine import LOGIT_ATOL, PROMPTS, greedy_reference


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """The weight after a GGUF Q8_0 round trip, as llama.cpp quantizes and gguf-py dequantizes it."""
    blocks = weight.float().reshape(-1, INT8_BLOCK)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.round(blocks / torch.where(d > 0, d, 1.0)).clamp(-127, 127)
    return (codes * d.half().float()).view(weight.shape)


def _linear(out_features: int, in_features: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=False)


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("in_features", [576, 40])  # 40: the scalar path (not a multiple of 16)
def test_linear_compact_matches_f_linear_with_the_widened_weight(rows, in_features):
    # Same values, other fp32 summation order: dot products of up to 576 unit-scale terms (sums ~25)
    # differ by re-association only, measured up to ~3e-5; 1e-4 leaves a margin.
    generator = torch.Generator().manual_seed(rows)
    codes = torch.randint(-127, 128, (300, in_features), dtype=torch.int8, generator=generator)
    block = 8 if in_features == 40 else INT8_BLOCK
    scales = torch.rand(codes.numel() // block, generator=generator) * 0.02
    bf16 = torch.randn(300, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator)
    widened = (codes.float().view(-1, block) * scales.view(-1, 1)).view(codes.shape)
    torch.testing.assert_close(
        op("linear_compact")(x, codes, scales, block), F.linear(x, widened), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        op("linear_compact")(x, bf16, torch.empty(0), 0), F.linear(x, bf16.float()), atol=1e-4, rtol=1e-4
    )
    assert torch.equal(reference.linear_compact(x, codes, scales, block), F.linear(x, widened))
    batched = op("linear_compact")(x.view(1, rows, in_features), bf16, torch.empty(0), 0)  # any leading dims
    assert batched.shape == (1, rows, 300)


def test_linear_compact_passes_opcheck_and_refuses_bad_operands():
    codes = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    scales = torch.rand(64 * 64 // INT8_BLOCK)
    torch.library.opcheck(op("linear_compact"), (torch.randn(3, 64), codes, scales, INT8_BLOCK))
    with pytest.raises(ShapeMismatchError, match="last dimension must be in_features = 64"):
        op("linear_compact")(torch.randn(3, 65), codes, scales, INT8_BLOCK)
    with pytest.raises(ShapeMismatchError, match="one float32 scale per block"):
        op("linear_compact")(torch.randn(3, 64), codes, scales[:-1], INT8_BLOCK)
    with pytest.raises(ShapeMismatchError, match="int8 or bfloat16"):
        op("linear_compact")(torch.randn(3, 64), codes.float(), scales, INT8_BLOCK)


def test_a_q8_0_weight_is_found_exactly_and_a_float_one_is_left_alone():
    linear = _linear(200, 96)
    plain = CompactHead(linear)
    assert plain.form == "float" and exact_int8_blocks(linear.weight) is None and exact_bf16(linear.weight) is None

    with torch.no_grad():
        linear.weight.copy_(q8_0(linear.weight))
    codes, scales = exact_int8_blocks(linear.weight)
    assert codes.abs().amax() == 127
    assert torch.equal((codes.float().view(-1, INT8_BLOCK) * scales.view(-1, 1)).view(codes.shape), linear.weight)
    head = CompactHead(linear)
    hidden = torch.randn(5, 96)
    assert head.form == "int8"
    torch.testing.assert_close(head(hidden), linear(hidden), atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        linear.weight[7, 3] += 1e-3  # one value off the grid: no longer Q8_0, and not a bf16 either
    assert CompactHead(linear).form == "float"

    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96).bfloat16().float())
    bf16_head = CompactHead(linear)
    assert bf16_head.form == "bf16"
    torch.testing.assert_close(bf16_head(hidden), linear(hidden), atol=1e-5, rtol=1e-5)


def test_many_rows_go_to_the_float_module():
    linear = _linear(100, 64)
    with torch.no_grad():
        linear.weight.copy_(q8_0(linear.weight))
    head = CompactHead(linear)
    calls = []
    linear.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    head(torch.randn(64, 64))
    head(torch.randn(65, 64))
    assert calls == [65]


def test_the_engine_decodes_the_float_models_tokens_through_a_q8_0_head(tiny_quantized, adapters_dir):
    model, tokenizer, config = tiny_quantized
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.copy_(q8_0(model.lm_head.weight))  # tied: the embedding is the same tensor
    assert PagedLlama(model, PagePool(num_pages=64, page_size=4096)).head.form == "int8"
    oracle = float_reference(model, config)
    engine = GenerationEngine(model, tokenizer, adapters_dir=adapters_dir, record_logits=True, num_pages=2048)
    handles = [(p, engine.submit(p, "base", SamplingParams(max_tokens=8))) for p in PROMPTS]
    engine.run_until_idle()
    finished = {id(r.handle): r for r in engine.finished}
    for prompt, handle in handles:
        request = finished[id(handle)]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        tokens, logits = greedy_reference(oracle, ids, 8, tokenizer.eos_token_id)
        assert request.generated == tokens
        for got, expected in zip(request.logits, logits):
            torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)
