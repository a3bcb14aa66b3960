"""Mixture of LoRA experts against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_qlora.adapters import AdapterConfigError, MixtureLoRAConfig


def _layer(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    layer = MixtureLoRAConfig(r=2, alpha=4, **kwargs).build(nn.Linear(6, 5))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_all_experts_with_uniform_router_average_the_experts():
    layer = _layer(num_experts=3, top_k=3)
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(4, 6)
    expected = sum(x @ (layer.lora_B[e] @ layer.lora_A[e]).T for e in range(3)) / 3 * 2.0
    with torch.no_grad():
        assert torch.allclose(layer(x) - layer.base(x), expected, atol=1e-6)
        assert layer.extra_loss().item() == pytest.approx(0.01 * 1.0)  # balanced: E * sum(1/E * 1/E) = 1


def test_top1_uses_only_the_chosen_expert_and_balance_loss_is_hand_computed():
    layer = _layer(num_experts=2, top_k=1, load_balance_weight=1.0)
    with torch.no_grad():
        layer.router.zero_()
        layer.router[1, 0] = 100.0  # tokens with x0 > 0 go to expert 1, others to expert 0
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0], [1.0, 1, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        delta = layer(x) - layer.base(x)
    for row, expert in zip(range(4), [1, 1, 0, 1], strict=True):
        expected = x[row] @ (layer.lora_B[expert] @ layer.lora_A[expert]).T * 2.0
        assert torch.allclose(delta[row], expected, atol=1e-5)
    probs = torch.softmax(x @ layer.router.T, -1)
    fraction = torch.tensor([0.25, 0.75])
    assert layer.extra_loss().item() == pytest.approx((2 * (fraction * probs.mean(0)).sum()).item(), rel=1e-6)


def test_cannot_merge_and_rejects_bad_top_k():
    with pytest.raises(AdapterConfigError, match="depends on the input"):
        _layer().merge()
    with pytest.raises(AdapterConfigError, match="top_k=5 exceeds num_experts=4"):
        MixtureLoRAConfig(top_k=5)
