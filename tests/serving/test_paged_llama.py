"""The paged runner against transformers' own forward: grouped K/V heads read without repetition,
prefill and decode rows mixed in one step, and the compiled 4-bit kernel called directly."""

from __future__ import annotations

import torch

from lightning_qlora.ops import backend, op
from lightning_qlora.serving.paged_llama import PagedLlama, SequenceStep
from lightning_qlora.serving.pool import PagePool


def _runner(model: torch.nn.Module) -> PagedLlama:
    return PagedLlama(model, PagePool(256, 128))


def _table(runner: PagedLlama, first_page: int, tokens: int) -> torch.Tensor:
    pages = runner.kv_pages_for(tokens)
    return torch.arange(first_page, first_page + pages, dtype=torch.int64).view(runner.num_layers, -1)


def test_prefill_and_decode_logits_equal_transformers_forward_with_grouped_kv_heads(tiny_quantized):
    model, _, _ = tiny_quantized
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2  # GQA is exercised
    runner = _runner(model)
    generator = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, model.config.vocab_size, (11,), generator=generator)
    short_ids = torch.randint(0, model.config.vocab_size, (5,), generator=generator)
    long_table, short_table = _table(runner, 0, 12), _table(runner, 64, 6)
    # step 1: both prompts prefilled together (different lengths); step 2: one decodes, one more token
    first = runner.forward([SequenceStep(long_ids, 0, long_table), SequenceStep(short_ids, 0, short_table)], None)
    extra = torch.tensor([3])
    second = runner.forward([SequenceStep(extra, 11, long_table)], None)
    with torch.no_grad():
        expect_long = model(long_ids.unsqueeze(0)).logits[0, -1]
        expect_short = model(short_ids.unsqueeze(0)).logits[0, -1]
        expect_next = model(torch.cat([long_ids, extra]).unsqueeze(0)).logits[0, -1]
    torch.testing.assert_close(first[0], expect_long, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(first[1], expect_short, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(second[0], expect_next, atol=2e-4, rtol=1e-4)


def test_the_step_calls_the_compiled_kernel_directly_with_the_ops_results(tiny_quantized):
    model, _, _ = tiny_quantized
    runner = _runner(model)
    if backend() == "cpp":
        assert runner._gemv_4bit is not op("linear_4bit")  # no dispatcher, no per-call Python validation
    ids = torch.tensor([5, 9, 2, 7])
    direct = runner.forward([SequenceStep(ids, 0, _table(runner, 0, 4))], None)
    runner._gemv_4bit = op("linear_4bit")
    through_op = runner.forward([SequenceStep(ids, 0, _table(runner, 0, 4))], None)
    assert torch.equal(direct, through_op)
