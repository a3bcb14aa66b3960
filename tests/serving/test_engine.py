"""The generation engine against the acceptance oracle: each request run alone, greedy, on a float
model holding the dequantized base with its adapter merged in.

Logit tolerance: the engine adds ``s (x A^T) B^T`` to the fused 4-bit product while the oracle
multiplies by ``W + s B A`` with BLAS, and attention/norms sum in other orders; every difference is
float32 re-association. For dot products of n <= 128 terms the bound is ``2 n u sum|terms|``
(u = 2^-24, about 1.5e-5 relative to the magnitudes), compounded over 2 layers and the head; the
measured worst case is about 1e-5 on logits of size ~0.5, so 1e-4 absolute leaves a 10x margin and
is still 100x below the gap that decides a greedy token here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_qlora.serving import GenerationEngine, InvalidRequestError, SamplingParams, UnknownAdapterError
from tests.serving.conftest import ADAPTERS, adapted_copy, float_reference

LOGIT_ATOL = 1e-4
PROMPTS = ["Hello there", "What is 2+2?", "abc", "The quick brown fox jumps", "x"]


def greedy_reference(model, prompt_ids: list[int], max_tokens: int, eos: int) -> tuple[list[int], list[torch.Tensor]]:
    """Full-recompute greedy decoding with transformers' own forward (no cache involved)."""
    sequence, tokens, logits = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            row = model(torch.tensor([sequence])).logits[0, -1].float()
            logits.append(row)
            token = int(row.argmax())
            if token == eos:
                break
            tokens.append(token)
            sequence.append(token)
    return tokens, logits


def _engine(tiny_quantized, adapters_dir, **kwargs) -> GenerationEngine:
    model, tokenizer, _ = tiny_quantized
    return GenerationEngine(model, tokenizer, adapters_dir=adapters_dir, record_logits=True, **kwargs)


def _check_against_references(engine, submitted, references, max_tokens):
    tokenizer = engine.tokenizer
    finished = {id(r.handle): r for r in engine.finished}
    for name, prompt, handle in submitted:
        request = finished[id(handle)]
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        tokens, logits = greedy_reference(references[name], ids, max_tokens, tokenizer.eos_token_id)
        assert request.generated == tokens, (name, prompt)
        assert len(request.logits) == len(logits)
        for got, expected in zip(request.logits, logits):
            torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)


def test_mixed_batch_equals_each_request_alone_with_its_adapter_merged(tiny_quantized, adapters_dir, references):
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048)
    slots_per_step = []
    original = engine._step_lora
    engine._step_lora = lambda requests, steps: (
        slots_per_step.append(len({r.adapter_name for r in requests})),
        original(requests, steps),
    )[1]
    names = ["base", *ADAPTERS]
    submitted = []
    for i in range(10):
        name, prompt = names[i % len(names)], PROMPTS[i % len(PROMPTS)]
        submitted.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_tokens=10))))
    engine.run_until_idle()
    assert max(slots_per_step) == len(names)  # decode steps really mixed base + all four adapters
    _check_against_references(engine, submitted, references, 10)
    assert engine.pool.stats().kv_pages == 0  # everything finished freed its KV pages


def test_requests_join_the_running_batch_between_decode_steps(tiny_quantized, adapters_dir, references):
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048)
    first = engine.submit(PROMPTS[0], "r4-all", SamplingParams(max_tokens=12))
    engine.step()
    engine.step()
    assert len(engine._running) == 1
    second = engine.submit(PROMPTS[3], "r16-attn", SamplingParams(max_tokens=12))
    engine.step()
    assert len(engine._running) == 2  # joined while the first is mid-generation
    engine.run_until_idle()
    _check_against_references(engine, [("r4-all", PROMPTS[0], first), ("r16-attn", PROMPTS[3], second)], references, 12)


@pytest.fixture(scope="module")
def twenty_adapters(tmp_path_factory, tiny_quantized):
    from lightning_qlora.adapters import export_peft, save_adapters

    model, _, config = tiny_quantized
    root = tmp_path_factory.mktemp("twenty")
    references = {}
    targets = ("all-linear", ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], ["o_proj", "k_proj"])
    for i in range(20):
        rank = (1, 2, 4, 8, 16)[i % 5]
        adapted = adapted_copy(model, rank, 2.0 * rank, targets[i % 4], seed=100 + i)
        (save_adapters if i % 2 else export_peft)(adapted, root / f"a{i:02d}")
        references[f"a{i:02d}"] = float_reference(adapted, config)
    return root, references


@pytest.mark.slow
def test_100_requests_over_20_adapters_in_a_pool_too_small_for_all(tiny_quantized, twenty_adapters, caplog):
    root, references = twenty_adapters
    probe = _engine(tiny_quantized, root, num_pages=100_000)
    adapter_pages = {name: probe.registry.pages_needed(name) for name in references}
    kv_per_request = probe.runner.kv_pages_for(len(PROMPTS[3]) + 6)
    # the 4 largest adapters + KV for a batch of 8: far below the sum of all 20 adapters
    num_pages = sum(sorted(adapter_pages.values())[-4:]) + 8 * kv_per_request
    assert num_pages < sum(adapter_pages.values())
    engine = _engine(tiny_quantized, root, num_pages=num_pages, max_batch_size=8)
    used_after_each_allocation = []
    allocate = engine.pool.allocate

    def instrumented(count, owner):
        pages = allocate(count, owner)
        used_after_each_allocation.append(engine.pool.used_pages)
        return pages

    engine.pool.allocate = instrumented
    generator = torch.Generator().manual_seed(0)
    submitted = []
    for i in range(100):
        name = f"a{int(torch.randint(20, (1,), generator=generator)):02d}"
        prompt = PROMPTS[i % len(PROMPTS)]
        submitted.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_tokens=6))))
    with caplog.at_level(logging.INFO, logger="lightning_qlora.serving.registry"):
        engine.run_until_idle()
    assert all(handle.done.is_set() for _, _, handle in submitted)
    assert max(used_after_each_allocation) <= num_pages and engine.pool.stats().peak_pages <= num_pages
    assert len(engine.registry.stats.evicted) > 0 and "evicted adapter" in caplog.text
    _check_against_references(engine, submitted, references, 6)


def test_stop_sequences_max_tokens_and_streaming(tiny_quantized, adapters_dir):
    engine = _engine(tiny_quantized, adapters_dir)
    full = engine.submit(PROMPTS[1], "r2-qv", SamplingParams(max_tokens=12))
    engine.run_until_idle()
    events = list(full)
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 12
    assert sum(1 for e in events if e.text) > 1  # streamed in pieces, not only at the end
    stop = text[5:7]
    stopped = engine.submit(PROMPTS[1], "r2-qv", SamplingParams(max_tokens=12, stop=(stop,)))
    engine.run_until_idle()
    pieces = list(stopped)
    assert "".join(e.text for e in pieces) == text[: text.find(stop)]
    assert pieces[-1].finish_reason == "stop"


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny_quantized, adapters_dir):
    engine = _engine(tiny_quantized, adapters_dir)
    greedy = engine.submit(PROMPTS[0], "r8-mlp", SamplingParams(max_tokens=8))
    nucleus = engine.submit(PROMPTS[0], "r8-mlp", SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1))
    hot = [
        engine.submit(PROMPTS[0], "r8-mlp", SamplingParams(max_tokens=8, temperature=2.0, seed=s)) for s in (5, 5, 6)
    ]
    engine.run_until_idle()
    assert nucleus.text() == greedy.text()
    texts = [h.text() for h in hot]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_cancel_frees_pages_and_bad_requests_are_refused(tiny_quantized, adapters_dir):
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048, max_prompt_tokens=50)
    handle = engine.submit(PROMPTS[0], "r4-all", SamplingParams(max_tokens=40))
    engine.step()
    assert engine.pool.stats().kv_pages > 0
    handle.cancel()
    engine.run_until_idle()
    assert list(handle)[-1].finish_reason == "cancelled"
    assert engine.pool.stats().kv_pages == 0 and engine.registry._loaded["r4-all"].pins == 0
    with pytest.raises(UnknownAdapterError, match="known: base, r16-attn"):
        engine.submit("hi", "missing")
    with pytest.raises(InvalidRequestError, match="at most 50") as error:
        engine.submit("y" * 51, "base")
    assert error.value.status == 413
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit("", "base")
    with pytest.raises(InvalidRequestError, match="max_tokens=-1"):
        SamplingParams(max_tokens=-1)


def test_a_non_streaming_handle_gets_the_whole_completion_in_one_event(tiny_quantized, adapters_dir):
    """``stream=False``: one event with the text a stream spells token by token, and the same counts
    (each event handed over wakes the caller's event loop; an HTTP answer sent whole needs only one)."""
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048)
    params = SamplingParams(max_tokens=8)
    streamed = engine.submit(PROMPTS[1], "r4-all", params)
    whole = engine.submit(PROMPTS[1], "r4-all", params, stream=False)
    engine.run_until_idle()
    streamed_events, whole_events = list(streamed), list(whole)
    assert len(streamed_events) > 2  # the stream really came in pieces
    assert len(whole_events) == 1
    (event,) = whole_events
    last = streamed_events[-1]
    assert event.text == "".join(e.text for e in streamed_events)
    assert (event.finish_reason, event.prompt_tokens, event.completion_tokens) == (
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
    )
