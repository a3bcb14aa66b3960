"""Page pool accounting, adapter file reading (ours and PEFT's), and the registry's LRU + pinning."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_qlora.serving import AdapterFormatError, PagePool, PoolExhaustedError, UnknownAdapterError
from lightning_qlora.serving.adapter_files import read_lora_factors
from lightning_qlora.serving.paged_llama import PagedLlama
from lightning_qlora.serving.registry import AdapterRegistry, pages_for_rows
from tests.serving.conftest import ADAPTERS


def test_pool_allocates_frees_and_refuses_overcommit():
    pool = PagePool(num_pages=8, page_size=16)
    first = pool.allocate(5, owner="kv:a")
    assert len(set(first)) == 5 and pool.free_pages == 3
    with pytest.raises(PoolExhaustedError, match="needs 4 pages but only 3"):
        pool.allocate(4, owner="adapter:x")
    assert pool.free_pages == 3  # a refused allocation takes nothing
    second = pool.allocate(3, owner="adapter:x")
    assert set(first).isdisjoint(second)
    stats = pool.stats()
    assert (stats.used_pages, stats.kv_pages, stats.adapter_pages, stats.peak_pages) == (8, 5, 3, 8)
    pool.free(first)
    with pytest.raises(ValueError, match="double free"):
        pool.free(first[:1])
    assert pool.stats().used_pages == 3 and pool.stats().peak_pages == 8


def test_pages_for_rows_packs_whole_rows():
    assert pages_for_rows([64, 64, 128], 128) == 2
    assert pages_for_rows([100, 100, 100], 128) == 3  # rows never straddle a page
    assert pages_for_rows([], 128) == 0


def test_reading_our_format_and_peft_gives_the_saved_factors(adapters_dir, tiny_quantized):
    for name, (rank, alpha, _, _) in ADAPTERS.items():
        factors = read_lora_factors(adapters_dir / name)
        assert factors.max_rank == rank
        module = next(iter(factors.modules.values()))
        assert module.scale == pytest.approx(alpha / rank)
        assert module.lora_A.shape[0] == module.lora_B.shape[1] == rank
        assert module.lora_B.abs().sum() > 0


def test_unservable_adapters_are_refused_with_a_reason(tmp_path, tiny_quantized):
    import copy

    from lightning_qlora.adapters import DoRAConfig, inject_adapters, save_adapters

    model = copy.deepcopy(tiny_quantized[0])
    inject_adapters(model, DoRAConfig(r=2), ["q_proj"])
    save_adapters(model, tmp_path / "dora")
    with pytest.raises(AdapterFormatError, match="'dora' adapters .*cannot be served"):
        read_lora_factors(tmp_path / "dora")
    with pytest.raises(AdapterFormatError, match="neither"):
        read_lora_factors(tmp_path)


def _registry(tiny_quantized, adapters_dir, num_pages: int) -> AdapterRegistry:
    model = tiny_quantized[0]
    pool = PagePool(num_pages, 128)
    return AdapterRegistry(pool, PagedLlama(model, pool).module_shapes, adapters_dir)


def test_registry_places_factors_where_its_tables_say(tiny_quantized, adapters_dir):
    registry = _registry(tiny_quantized, adapters_dir, 1024)
    adapter = registry.acquire("r4-all")
    factors = read_lora_factors(adapters_dir / "r4-all")
    for m, name in enumerate(registry.module_index):
        f = factors.modules[name]
        assert adapter.ranks[m] == 4 and adapter.scales[m] == pytest.approx(f.scale)
        for j in range(4):
            a = int(adapter.a_rows[m, j])
            b = int(adapter.b_rows[m, j])
            assert torch.equal(registry.pool.data[a : a + f.lora_A.shape[1]], f.lora_A[j])
            assert torch.equal(registry.pool.data[b : b + f.lora_B.shape[0]], f.lora_B[:, j])
    assert registry.pool.stats().adapter_pages == registry.pages_needed("r4-all") == len(adapter.pages)


def test_registry_evicts_least_recently_used_idle_adapters_only(tiny_quantized, adapters_dir, caplog):
    sizes = {}
    big = _registry(tiny_quantized, adapters_dir, 4096)
    for name in ADAPTERS:
        sizes[name] = big.pages_needed(name)
    # room for r16-attn + either of r4-all, r8-mlp -- never for all three
    registry = _registry(tiny_quantized, adapters_dir, sizes["r16-attn"] + max(sizes["r4-all"], sizes["r8-mlp"]))
    pinned = registry.acquire("r16-attn")
    idle = registry.acquire("r4-all")
    registry.release(idle)
    with caplog.at_level(logging.INFO, logger="lightning_qlora.serving.registry"):
        registry.acquire("r8-mlp")
    assert registry.stats.evicted == ["r4-all"] and "evicted adapter 'r4-all'" in caplog.text
    assert "r16-attn" in registry.loaded()  # pinned: never evicted
    with pytest.raises(PoolExhaustedError, match="in use"):
        registry.acquire("r4-all")  # both resident adapters are pinned now
    registry.release(pinned)
    registry.acquire("r4-all")
    assert registry.stats.evicted == ["r4-all", "r16-attn"]
    with pytest.raises(UnknownAdapterError, match="known: r16-attn, r2-qv, r4-all, r8-mlp"):
        registry.acquire("nope")
