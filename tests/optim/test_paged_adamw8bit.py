"""PagedAdamW8bit against bitsandbytes' AdamW8bit (the oracle) and fp32 AdamW."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch

from lightning_qlora.optim import MmapPageStore, PagedAdamW8bit, unsigned_dynamic_map_8bit
from lightning_qlora.quantization.codebooks import dynamic_map_8bit

SHAPES = ((300, 70), (5000,), (33,), (64, 64))  # (33,) and (64, 64) stay 32-bit (< min_8bit_size)


def _params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in SHAPES]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def test_state_maps_are_bitsandbytes_dynamic_maps():
    assert torch.equal(dynamic_map_8bit(), bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(unsigned_dynamic_map_8bit(), bnb_functional.create_dynamic_map(signed=False))


@pytest.mark.parametrize("paged_store", ["host", "mmap"])
def test_matches_bitsandbytes_adamw8bit_over_100_steps(tmp_path, paged_store):
    bnb_params, paged_params, fp32_params = _params(), _params(), _params()
    oracle = bnb.optim.AdamW8bit(bnb_params, lr=1e-2, weight_decay=0.1)
    store = (
        {"store": MmapPageStore(tmp_path, budget_bytes=1 << 20), "page_elements": 4096} if paged_store == "mmap" else {}
    )
    paged = PagedAdamW8bit(paged_params, lr=1e-2, weight_decay=0.1, **store)
    exact = torch.optim.AdamW(fp32_params, lr=1e-2, weight_decay=0.1)
    for optimizer, params in ((oracle, bnb_params), (paged, paged_params), (exact, fp32_params)):
        _train(optimizer, params, 100)
    for ours, theirs, fp32 in zip(paged_params, bnb_params, fp32_params, strict=True):
        # same operations in the same order and the same quantizer: bitsandbytes' numbers exactly,
        # hence exactly its quantization error with respect to 32-bit AdamW
        assert torch.equal(ours, theirs)
        assert (ours - fp32).abs().max() == (theirs - fp32).abs().max()
    # the 8-bit error is real (the test would notice a silently 32-bit state)
    assert (paged_params[0] - fp32_params[0]).abs().max() > 1e-4


def test_checkpoints_interoperate_with_bitsandbytes(tmp_path):
    bnb_params, paged_params = _params(), _params()
    oracle = bnb.optim.AdamW8bit(bnb_params, lr=1e-2)
    _train(oracle, bnb_params, 3)
    paged = PagedAdamW8bit(paged_params, lr=1e-2, store=MmapPageStore(tmp_path, budget_bytes=1 << 20))
    with torch.no_grad():
        for source, target in zip(bnb_params, paged_params, strict=True):
            target.copy_(source)
    paged.load_state_dict(oracle.state_dict())
    back_params = [torch.nn.Parameter(p.detach().clone()) for p in paged_params]
    back = bnb.optim.AdamW8bit(back_params, lr=1e-2)
    back.load_state_dict(paged.state_dict())  # and pages back into bitsandbytes
    _train(oracle, bnb_params, 2, seed=7)
    _train(paged, paged_params, 2, seed=7)
    _train(back, back_params, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(bnb_params, paged_params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(bnb_params, back_params, strict=True))


def test_resume_gives_the_same_next_step(tmp_path):
    params = _params()
    optimizer = PagedAdamW8bit(params, lr=1e-2, store=MmapPageStore(tmp_path / "a", budget_bytes=1 << 20))
    _train(optimizer, params, 3)
    state = optimizer.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = PagedAdamW8bit(resumed_params, lr=1e-2, store=MmapPageStore(tmp_path / "b", budget_bytes=1 << 20))
    resumed.load_state_dict(state)
    _train(optimizer, params, 1, seed=3)
    _train(resumed, resumed_params, 1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params, strict=True))


@pytest.mark.parametrize("numel", [256, 4096 * 3 + 17, 70_001])
def test_state_quantizer_is_the_custom_op_bit_for_bit(numel):
    import lightning_qlora.ops  # noqa: F401
    from lightning_qlora.optim.quantize8bit import dequantize_state_8bit, quantize_state_8bit

    values = torch.randn(numel) * torch.logspace(-6, 0, numel)
    values[:256] = 0  # an all-zero block
    for code in (dynamic_map_8bit(), unsigned_dynamic_map_8bit()):
        source = values if code.min() < 0 else values.abs()
        codes, absmax = quantize_state_8bit(source, code, 256)
        expected_codes, expected_absmax = torch.ops.lightning_qlora.quantize_blockwise_8bit(source, code, 256)
        assert torch.equal(codes, expected_codes) and torch.equal(absmax, expected_absmax)
        expected = torch.ops.lightning_qlora.dequantize_blockwise_8bit(codes, absmax, code, 256, torch.float32)
        assert torch.equal(dequantize_state_8bit(codes, absmax, code, 256), expected)
