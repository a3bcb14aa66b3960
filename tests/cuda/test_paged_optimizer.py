"""The managed-memory page store on a real GPU, and PagedAdamW on it bit-exact with torch.optim.AdamW on cuda."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.optim import CudaManagedPageStore, PagedAdamW, make_page_store
from tests.optim.test_paged_adamw import _groups, _params

from .marks import CUDA_ONLY

pytestmark = CUDA_ONLY

PAGE = 1 << 16


def _cuda_params(seed: int = 1) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().cuda()) for p in _params(seed)]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 2) -> None:
    """The CPU test's gradients (same generator, same order), moved to the parameters' GPU."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).cuda()
        optimizer.step()


def test_pages_keep_their_data_through_eviction_within_the_budget():
    store = CudaManagedPageStore("cuda", budget_bytes=2 * PAGE)
    extents = store.allocate([PAGE] * 6)
    for value, extent in enumerate(extents):
        view = store.fetch(extent)
        assert view.is_cuda
        view.fill_(value + 1)
        store.release(extent, view, dirty=True)
        assert store.resident_bytes <= store.budget_bytes
    store.synchronize()
    assert store.peak_resident_bytes == 2 * PAGE
    for value, extent in enumerate(extents):
        assert torch.all(store.read(extent).cpu() == value + 1)


def test_auto_store_on_cuda_is_managed_memory():
    assert isinstance(make_page_store("auto", "cuda"), CudaManagedPageStore)


@pytest.mark.parametrize("foreach", [False, None], ids=["single-tensor", "default"])
@pytest.mark.parametrize("budget", [None, 4 * PAGE], ids=["unbounded", "tight"])
def test_paged_adamw_on_managed_pages_equals_torch_adamw_on_cuda(foreach, budget):
    reference_params, paged_params = _cuda_params(), _cuda_params()
    reference = torch.optim.AdamW(_groups(reference_params), weight_decay=0.1, foreach=foreach)
    store = CudaManagedPageStore("cuda", budget_bytes=budget)
    paged = PagedAdamW(_groups(paged_params), weight_decay=0.1, store=store, page_elements=4096)
    _train(reference, reference_params, 100)
    _train(paged, paged_params, 100)
    store.synchronize()
    for expected, actual in zip(reference_params, paged_params, strict=True):
        assert actual.is_cuda and torch.equal(expected, actual)
    exported = paged.state_dict()["state"]
    for index, expected in reference.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(exported[index][key].cpu(), expected[key].cpu()), (index, key)
        assert float(exported[index]["step"]) == float(expected["step"])
    if budget is not None:
        assert 0 < store.peak_resident_bytes <= budget
