"""A bad adapter, a full pool or a bad argument fails only what it concerns, with its typed error (issue 16)."""

from __future__ import annotations

import copy
import json
import shutil
import time

import pytest
import torch

from lightning_qlora.adapters import LoRAConfig, inject_adapters, save_adapters
from lightning_qlora.serving import (
    AdapterFormatError,
    GenerationEngine,
    PoolExhaustedError,
    SamplingParams,
    ServerConfigError,
    UnsupportedModelError,
)
from tests.serving.conftest import adapted_copy


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, tiny_quantized, adapters_dir):
    """The good test adapters plus five broken ones, as a user would produce them."""
    from lightning_qlora.models.tiny import load_tiny_llama
    from lightning_qlora.quantization.convert import quantize_linears

    model = tiny_quantized[0]
    root = tmp_path_factory.mktemp("mixed")
    for good in ("r2-qv", "r4-all"):
        shutil.copytree(adapters_dir / good, root / good)
    other, _ = load_tiny_llama(hidden_size=32, num_layers=2, seed=1)  # another model's shapes
    quantize_linears(other, "nf4", 32, double_quant=True)
    save_adapters(adapted_copy(other, 2, 4.0, ["q_proj"], 0), root / "wrong-shape")
    lm_head = copy.deepcopy(model)
    inject_adapters(lm_head, LoRAConfig(r=2, alpha=4.0), ["q_proj", "lm_head"], exclude=())  # skip_modules=[]
    with torch.no_grad():
        for name, parameter in lm_head.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    save_adapters(lm_head, root / "lm-head")
    shutil.copytree(root / "r2-qv", root / "rank-mismatch")
    meta = json.loads((root / "rank-mismatch" / "adapter.json").read_text())
    meta["config"]["r"] = 8  # tensors are rank 2
    (root / "rank-mismatch" / "adapter.json").write_text(json.dumps(meta))
    shutil.copytree(root / "r2-qv", root / "truncated")
    weights = root / "truncated" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    shutil.copytree(root / "r2-qv", root / "no-r")
    meta = json.loads((root / "no-r" / "adapter.json").read_text())
    del meta["config"]["r"]
    (root / "no-r" / "adapter.json").write_text(json.dumps(meta))
    return root


BAD = {
    "wrong-shape": "another model",
    "lm-head": "lm_head",
    "rank-mismatch": "rank 8",
    "truncated": "truncated",
    "no-r": "'r'",
}


def _alone(tiny_quantized, root, name, prompt):
    engine = GenerationEngine(tiny_quantized[0], tiny_quantized[1], adapters_dir=root)
    handle = engine.submit(prompt, name, SamplingParams(max_tokens=8))
    engine.run_until_idle()
    return handle.text()


def test_bad_adapters_fail_alone_with_typed_errors_and_good_requests_complete(tiny_quantized, mixed_dir):
    engine = GenerationEngine(tiny_quantized[0], tiny_quantized[1], adapters_dir=mixed_dir, num_pages=2048)
    good = [engine.submit("Hello there", name, SamplingParams(max_tokens=8)) for name in ("r2-qv", "r4-all", "base")]
    for name, reason in BAD.items():
        with pytest.raises(AdapterFormatError, match=reason) as error:
            engine.submit("Hello there", name, SamplingParams(max_tokens=8))
        assert f"adapter {name!r}" in str(error.value) and error.value.status == 422
    engine.run_until_idle()
    for name, handle in zip(("r2-qv", "r4-all", "base"), good):
        assert handle.text() == _alone(tiny_quantized, mixed_dir, name, "Hello there")
    assert engine.pool.stats().kv_pages == 0 and not engine.has_work()


def test_adapter_broken_after_submission_fails_only_its_request_in_the_batch(tiny_quantized, mixed_dir, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(mixed_dir / "r2-qv", root / "r2-qv")
    shutil.copytree(mixed_dir / "r4-all", root / "soon-broken")
    engine = GenerationEngine(tiny_quantized[0], tiny_quantized[1], adapters_dir=root, num_pages=2048)
    good = engine.submit("abc", "r2-qv", SamplingParams(max_tokens=8))
    doomed = engine.submit("abc", "soon-broken", SamplingParams(max_tokens=8))
    weights = root / "soon-broken" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # damaged between submission and admission
    engine.run_until_idle()
    last = list(doomed)[-1]
    assert last.finish_reason == "error" and last.status == 422 and "soon-broken" in last.error
    assert good.text() == _alone(tiny_quantized, mixed_dir, "r2-qv", "abc")
    stats = engine.pool.stats()  # every request's KV returned; what is left: adapters and the cached prompt blocks
    assert stats.kv_pages == 0 and stats.adapter_pages + stats.prefix_pages == engine.pool.used_pages
    assert stats.prefix_pages == engine.prefix_cache.pages and engine.prefix_cache.clear() == stats.prefix_pages


def test_request_not_admitted_within_the_wait_gets_503_with_retry_after(tiny_quantized):
    engine = GenerationEngine(tiny_quantized[0], tiny_quantized[1], num_pages=64, max_queue_wait_s=0.05)
    held = engine.pool.allocate(60, owner="kv:someone-else")  # leaves too few pages for the request
    waiting = engine.submit("abc", "base", SamplingParams(max_tokens=40))
    assert not engine.step()  # cannot be admitted: nothing runs, no busy loop
    time.sleep(0.1)
    engine.step()
    last = list(waiting)[-1]
    assert last.status == 503 and last.retry_after >= 1 and "max_queue_wait_s" in last.error
    assert last.error_type == "server_busy" and not engine.has_work()
    engine.pool.free(held)
    assert engine.pool.used_pages == 0
    ok = engine.submit("abc", "base", SamplingParams(max_tokens=4))
    engine.run_until_idle()
    assert list(ok)[-1].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"max_prompt_tokens": -1}, {"num_pages": 0}, {"max_queue_wait_s": 0}, {"page_size": True}],
)
def test_engine_arguments_are_validated_before_anything_is_built(tiny_quantized, kwargs):
    with pytest.raises(ServerConfigError, match=next(iter(kwargs))):
        GenerationEngine(tiny_quantized[0], tiny_quantized[1], **kwargs)


def test_unsupported_family_is_refused_naming_the_served_ones(tiny_quantized):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        GenerationEngine(transformers.GPT2LMHeadModel(config), tiny_quantized[1])


@pytest.mark.parametrize("bad", ["max_batch_size=0", "max_prompt_tokens=-1", "threads=0", "num_pages=abc"])
def test_server_arguments_are_validated_at_startup_naming_the_bad_one(adapters_dir, bad):
    from lightning_qlora.serving.cli import main

    with pytest.raises(SystemExit, match=bad.split("=")[0]):
        main(["serve", f"adapters_dir={adapters_dir}", "model=tiny", bad])


def test_the_server_engine_runs_on_the_threads_it_was_given(adapters_dir):
    from lightning_qlora.serving.api import ServerConfig

    previous = torch.get_num_threads()
    try:
        engine = ServerConfig(adapters_dir=str(adapters_dir), model="tiny", num_pages=256, threads=1).build_engine()
        assert torch.get_num_threads() == 1 and engine.pool.num_pages == 256
    finally:
        torch.set_num_threads(previous)
