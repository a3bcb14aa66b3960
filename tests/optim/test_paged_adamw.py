"""PagedAdamW gives torch.optim.AdamW's results bit for bit, on every store, and checkpoints interoperate."""

from __future__ import annotations

import io

import pytest
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device

from lightning_qlora.optim import (
    HostPageStore,
    MmapPageStore,
    PageBudgetError,
    PagedAdamW,
    PagedOptimizerError,
    PagedState,
)

SHAPES = ((300, 70), (5000,), (33,), (4096 * 3 + 5,))


def _params(seed: int = 1) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in SHAPES]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    # two groups with their own lr / weight decay, as LoRA+ makes
    return [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0}]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


STORES = {
    "host": lambda tmp_path: {"store": HostPageStore()},
    "host-small-pages": lambda tmp_path: {"store": HostPageStore(), "page_elements": 4096},
    "mmap-1MiB": lambda tmp_path: {"store": MmapPageStore(tmp_path, budget_bytes=1 << 20)},
    "mmap-tight": lambda tmp_path: {"store": MmapPageStore(tmp_path, budget_bytes=4 << 16), "page_elements": 4096},
}


@pytest.mark.parametrize("store", list(STORES))
def test_paged_adamw_equals_torch_adamw_bit_for_bit_over_100_steps(tmp_path, store):
    reference_params, paged_params = _params(), _params()
    reference = torch.optim.AdamW(_groups(reference_params), weight_decay=0.1)
    paged = PagedAdamW(_groups(paged_params), weight_decay=0.1, **STORES[store](tmp_path))
    _train(reference, reference_params, 100)
    _train(paged, paged_params, 100)
    for expected, actual in zip(reference_params, paged_params, strict=True):
        assert torch.equal(expected, actual)
    exported = paged.state_dict()["state"]
    for index, expected in reference.state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(exported[index][key], expected[key]), (index, key)
    if paged.store.budget_bytes is not None:
        assert 0 < paged.store.peak_resident_bytes <= paged.store.budget_bytes


def test_maximize_matches_torch():
    reference_params, paged_params = _params(), _params()
    reference = torch.optim.AdamW(reference_params, lr=1e-2, maximize=True)
    paged = PagedAdamW(paged_params, lr=1e-2, maximize=True)
    _train(reference, reference_params, 5)
    _train(paged, paged_params, 5)
    assert all(torch.equal(a, b) for a, b in zip(reference_params, paged_params, strict=True))


def test_checkpoints_interoperate_with_torch_adamw(tmp_path):
    torch_params, paged_params = _params(), _params()
    torch_optimizer = torch.optim.AdamW(_groups(torch_params))
    _train(torch_optimizer, torch_params, 3)
    paged = PagedAdamW(_groups(paged_params), store=MmapPageStore(tmp_path, budget_bytes=1 << 20))
    with torch.no_grad():
        for source, target in zip(torch_params, paged_params, strict=True):
            target.copy_(source)
    paged.load_state_dict(torch_optimizer.state_dict())  # torch's checkpoint into pages
    _train(torch_optimizer, torch_params, 3, seed=5)
    _train(paged, paged_params, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(torch_params, paged_params, strict=True))
    back = torch.optim.AdamW(_groups(torch_params))
    back.load_state_dict(paged.state_dict())  # and pages back into torch
    assert all(torch.equal(back.state[p]["exp_avg"], torch_optimizer.state[p]["exp_avg"]) for p in torch_params)


def test_resume_restores_the_paged_state_exactly(tmp_path):
    params = _params()
    optimizer = PagedAdamW(params, lr=1e-2, store=MmapPageStore(tmp_path / "a", budget_bytes=1 << 20))
    _train(optimizer, params, 4)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_params = [torch.nn.Parameter(p) for p in checkpoint["params"]]
    resumed = PagedAdamW(resumed_params, lr=1e-2, store=MmapPageStore(tmp_path / "b", budget_bytes=1 << 20))
    resumed.load_state_dict(checkpoint["optimizer"])
    _train(optimizer, params, 1, seed=9)
    _train(resumed, resumed_params, 1, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params, strict=True))


def test_lightning_optimizer_state_move_leaves_pages_alone(tmp_path):
    params = _params()
    optimizer = PagedAdamW(params, store=MmapPageStore(tmp_path, budget_bytes=1 << 20))
    _train(optimizer, params, 2)
    handles = {p: optimizer.state[p]["paged"] for p in params}
    resident = optimizer.store.resident_bytes
    _optimizer_to_device(optimizer, torch.device("cpu"))  # what Lightning does on setup and resume
    for param in params:
        assert optimizer.state[param]["paged"] is handles[param]
        assert isinstance(optimizer.state[param]["paged"], PagedState)
        assert not any(
            isinstance(value, torch.Tensor) and value.numel() > 1 for value in optimizer.state[param].values()
        )
    assert optimizer.store.resident_bytes == resident


def test_params_without_grad_are_skipped_like_torch():
    reference_params, paged_params = _params(), _params()
    reference, paged = torch.optim.AdamW(reference_params), PagedAdamW(paged_params)
    for params, optimizer in ((reference_params, reference), (paged_params, paged)):
        params[0].grad = torch.ones_like(params[0])
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(reference_params, paged_params, strict=True))
    assert set(paged.state_dict()["state"]) == set(reference.state_dict()["state"]) == {0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"page_elements": 1000}, "multiple of 4096"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(PagedOptimizerError, match=match):
        PagedAdamW(_params(), **kwargs)


def test_budget_too_small_for_two_pages_fails_at_construction(tmp_path):
    with pytest.raises(PageBudgetError, match="raise budget_bytes"):
        PagedAdamW(_params(), store=MmapPageStore(tmp_path, budget_bytes=64 * 1024))


def test_non_contiguous_parameter_is_rejected():
    param = torch.nn.Parameter(torch.randn(8, 8).t())
    with pytest.raises(PagedOptimizerError, match="contiguous"):
        PagedAdamW([param])


def test_loading_a_foreign_state_dict_names_the_mismatch():
    params = _params()
    optimizer = PagedAdamW(params)
    state = {
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
        "param_groups": optimizer.state_dict()["param_groups"],
    }
    with pytest.raises(PagedOptimizerError, match="expects exp_avg"):
        optimizer.load_state_dict(state)
