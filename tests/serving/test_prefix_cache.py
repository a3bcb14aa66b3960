"""The prefix cache: requests that start like an earlier one (same adapter) reuse its prompt blocks'
KV pages and still generate what the float oracle generates; adapters never share; cached blocks
give their pages back when a request or an adapter load needs them; nothing leaks."""

from __future__ import annotations

import pytest

from lightning_qlora.serving import GenerationEngine, SamplingParams
from lightning_qlora.serving.prefix_cache import PrefixCache
from tests.serving.test_engine import _check_against_references

SYSTEM = "You are a terse assistant. Answer in one line. "
PROMPTS = [SYSTEM + "What is 2+2?", SYSTEM + "Name a colour.", SYSTEM + "What is 2+2?"]


def _engine(tiny_quantized, adapters_dir, **kwargs) -> GenerationEngine:
    model, tokenizer, _ = tiny_quantized
    return GenerationEngine(model, tokenizer, adapters_dir=adapters_dir, record_logits=True, **kwargs)


def _tokens(engine, prompt: str) -> int:
    return len(engine.tokenizer.encode(prompt, add_special_tokens=False))


@pytest.mark.parametrize("name", ["base", "r4-all"])
def test_later_requests_reuse_the_shared_prompt_blocks_and_match_the_oracle(
    tiny_quantized, adapters_dir, references, name
):
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048)
    tpp = engine.runner.tokens_per_page
    prefilled = []
    original = engine.runner.forward
    engine.runner.forward = lambda steps, lora: (
        prefilled.append([s.tokens.numel() for s in steps]),
        original(steps, lora),
    )[1]
    submitted, first_prefill = [], []
    for prompt in PROMPTS:  # one after another: each later one finds the earlier blocks cached
        steps_before = len(prefilled)
        submitted.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_tokens=6))))
        engine.run_until_idle()
        first_prefill.append(prefilled[steps_before][0])  # its first step: the prefill
    _check_against_references(engine, submitted, references, 6)
    shared = _tokens(engine, SYSTEM) // tpp * tpp  # whole blocks of the common start
    assert shared >= 2 * tpp
    stats = engine.prefix_cache.stats
    assert stats.misses == 1 and stats.hits == 2 and stats.reused_tokens >= 2 * shared
    assert first_prefill[0] == _tokens(engine, PROMPTS[0])  # the first prompt prefilled whole
    assert first_prefill[1] <= _tokens(engine, PROMPTS[1]) - shared  # the second only past the shared blocks
    # the third repeats the first: every block but the last token's is reused, one token or a block's worth prefilled
    assert first_prefill[2] <= tpp
    assert engine.pool.stats().kv_pages == 0
    assert all(block.refs == 0 for block in engine.prefix_cache._blocks.values())


def test_the_cache_changes_no_token_and_adapters_never_share_blocks(tiny_quantized, adapters_dir):
    outputs = {}
    for caching in (False, True):
        engine = _engine(tiny_quantized, adapters_dir, num_pages=2048, prefix_caching=caching)
        texts = []
        for name in ("r2-qv", "r16-attn", "base", "r2-qv", "r16-attn", "base"):
            handle = engine.submit(PROMPTS[0], name, SamplingParams(max_tokens=6))
            engine.run_until_idle()
            texts.append(handle.text())
        outputs[caching] = texts
        if caching:  # each name missed once (no block of one adapter serves another), then hit
            assert engine.prefix_cache.stats.misses == 3 and engine.prefix_cache.stats.hits == 3
        else:
            assert engine.prefix_cache is None and engine.pool.used_pages == engine.pool.stats().adapter_pages
    assert outputs[True] == outputs[False]


def test_cached_blocks_give_their_pages_to_requests_and_adapter_loads(tiny_quantized, adapters_dir):
    probe = _engine(tiny_quantized, adapters_dir)
    kv = probe.runner.kv_pages_for(_tokens(probe, PROMPTS[1]) + 4)
    adapter_pages = probe.registry.pages_needed("r16-attn")
    # room for one request's KV and one adapter, not also for what the cache keeps
    engine = _engine(tiny_quantized, adapters_dir, num_pages=kv + adapter_pages + 1)
    engine.submit(PROMPTS[0], "base", SamplingParams(max_tokens=4))
    engine.run_until_idle()
    assert engine.prefix_cache.pages > 0  # the first prompt's blocks stayed cached
    held = engine.prefix_cache.pages
    done = engine.submit(PROMPTS[1], "r16-attn", SamplingParams(max_tokens=4))  # needs the cached pages back
    engine.run_until_idle()
    assert list(done)[-1].finish_reason in ("stop", "length")
    assert engine.prefix_cache.stats.evicted_blocks > 0 and engine.pool.used_pages <= engine.pool.num_pages
    assert engine.pool.stats().kv_pages == 0 and held > 0


def test_a_cancelled_or_failed_request_releases_its_shared_blocks(tiny_quantized, adapters_dir):
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048)
    engine.submit(PROMPTS[0], "base", SamplingParams(max_tokens=2))
    engine.run_until_idle()
    handle = engine.submit(PROMPTS[2], "base", SamplingParams(max_tokens=50))
    engine.step()  # admitted on the cached prefix, prefilled
    referenced = [b for b in engine.prefix_cache._blocks.values() if b.refs > 0]
    assert referenced  # it holds the shared blocks while it runs
    handle.cancel()
    engine.run_until_idle()
    assert all(b.refs == 0 for b in engine.prefix_cache._blocks.values())
    assert engine.pool.stats().kv_pages == 0
    assert engine.prefix_cache.clear() > 0 and engine.pool.used_pages == 0


def test_releasing_a_block_twice_is_an_error(tiny_quantized, adapters_dir):
    engine = _engine(tiny_quantized, adapters_dir, num_pages=2048)
    engine.submit(PROMPTS[0], "base", SamplingParams(max_tokens=2))
    engine.run_until_idle()
    cache: PrefixCache = engine.prefix_cache
    chain = cache.lookup(None, engine.tokenizer.encode(PROMPTS[0], add_special_tokens=False))
    assert chain
    again = list(chain)
    cache.release(chain)
    with pytest.raises(ValueError, match="released more often"):
        cache.release(again)


def test_serve_takes_prefix_caching_as_a_strict_boolean():
    from lightning_qlora.serving.cli import parse_args

    assert parse_args(["adapters_dir=x", "prefix_caching=false"])[0]["prefix_caching"] is False
    assert parse_args(["adapters_dir=x", "prefix_caching=on"])[0]["prefix_caching"] is True
    with pytest.raises(SystemExit, match="prefix_caching='flase' must be true or false"):
        parse_args(["adapters_dir=x", "prefix_caching=flase"])
