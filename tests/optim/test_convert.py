"""Converting optimizers: supported classes, kept groups and schedulers, clear errors."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch

from lightning_qlora.adapters import LoRAPlusConfig, adapter_param_groups, inject_adapters
from lightning_qlora.optim import (
    PagedAdamW,
    PagedAdamW8bit,
    PagedOptimizerError,
    PagingConfig,
    UnsupportedOptimizerError,
    repoint_lr_schedulers,
    to_paged_optimizer,
)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_unsupported_optimizer_lists_the_supported_ones():
    with pytest.raises(
        UnsupportedOptimizerError,
        match=r"torch\.optim\.sgd\.SGD.*Supported optimizers: torch\.optim\.AdamW.*bitsandbytes",
    ):
        to_paged_optimizer(torch.optim.SGD(_model().parameters(), lr=0.1))


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad"),
        (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), "L2 weight decay"),
    ],
)
def test_unsupported_options_are_named(make, why):
    with pytest.raises(UnsupportedOptimizerError, match=why):
        to_paged_optimizer(make(_model().parameters()))


def test_lora_plus_groups_are_kept_as_the_same_dicts():
    model = _model()
    inject_adapters(model, LoRAPlusConfig(r=2, lr_ratio=16))
    groups = adapter_param_groups(model, 1e-3)
    original = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    paged = to_paged_optimizer(original)
    assert isinstance(paged, PagedAdamW)
    assert [g["lr"] for g in paged.param_groups] == [1e-3, 16e-3] * (len(groups) // 2)
    assert all(a is b for a, b in zip(paged.param_groups, original.param_groups, strict=True))
    assert all(g["weight_decay"] == 0.05 for g in paged.param_groups)


def test_schedulers_drive_the_paged_optimizer_without_warnings():
    original = torch.optim.AdamW(_model().parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(original, step_size=1, gamma=0.5)
    paged = to_paged_optimizer(original)
    assert repoint_lr_schedulers([scheduler], original, paged) == 1
    for param in paged.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paged.step()
        scheduler.step()
    assert paged.param_groups[0]["lr"] == 0.5


def test_existing_state_is_carried_over():
    params = list(_model().parameters())
    original = torch.optim.AdamW(params, lr=1e-2)
    for param in params:
        param.grad = torch.randn_like(param)
    original.step()
    paged = to_paged_optimizer(original)
    exported = paged.state_dict()["state"]
    assert all(torch.equal(exported[i]["exp_avg"], original.state[p]["exp_avg"]) for i, p in enumerate(params))


def test_bitsandbytes_8bit_becomes_paged_8bit_and_optim_bits_overrides():
    assert isinstance(to_paged_optimizer(bnb.optim.AdamW8bit(_model().parameters())), PagedAdamW8bit)
    assert isinstance(to_paged_optimizer(bnb.optim.PagedAdamW32bit(_model().parameters())), PagedAdamW)
    forced = to_paged_optimizer(torch.optim.AdamW(_model().parameters()), PagingConfig(optim_bits=8))
    assert isinstance(forced, PagedAdamW8bit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_bitsandbytes_implementation_refuses_cpu_instead_of_silently_not_paging():
    with pytest.raises(PagedOptimizerError, match="silently run unpaged"):
        to_paged_optimizer(torch.optim.AdamW(_model().parameters()), PagingConfig(implementation="bitsandbytes"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"store": "disk"}, "store='disk'"),
        ({"optim_bits": 4}, "optim_bits=4"),
        ({"implementation": "apex"}, "implementation='apex'"),
        ({"budget_bytes": 0}, "budget_bytes=0"),
    ],
)
def test_paging_config_validates(kwargs, match):
    with pytest.raises(PagedOptimizerError, match=match):
        PagingConfig(**kwargs)
