"""AdaLoRA layer: orthogonality loss, importance statistics and rank masks against closed forms."""

from __future__ import annotations

import torch
from torch import nn

from lightning_qlora.adapters import AdaLoRAConfig


def _layer(r: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return AdaLoRAConfig(r=r, alpha=6, orth_reg_weight=0.5).build(nn.Linear(5, 4))


def test_orthogonality_loss_hand_computed():
    layer = _layer(2)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0]]))  # Q Q^T = diag(1, 4)
        layer.lora_B.copy_(torch.tensor([[1.0, 1.0], [0, 0], [0, 0], [0, 0]]))  # P^T P = [[1, 1], [1, 1]]
    # ||diag(0, 3)||^2 = 9 ; ||[[0, 1], [1, 0]]||^2 = 2 ; times 0.5
    assert layer.extra_loss().item() == 0.5 * (9 + 2)


def test_importance_ema_and_triplet_scores_closed_form():
    layer = _layer(3)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([1.0, -2.0, 0.5]))
    grads = []
    for step in range(2):
        layer.zero_grad()
        (layer(torch.randn(7, 5)) * (step + 1)).square().sum().backward()
        grads.append(
            {
                n: (getattr(layer, n).detach().clone(), getattr(layer, n).grad.clone())
                for n in ("lora_A", "lora_E", "lora_B")
            }
        )
        layer.update_importance(beta1=0.8, beta2=0.6)
    expected = {}
    for name in ("lora_A", "lora_E", "lora_B"):
        i_bar = torch.zeros_like(grads[0][name][0])
        u_bar = torch.zeros_like(i_bar)
        for step in range(2):
            value, grad = grads[step][name]
            sensitivity = (value * grad).abs()
            i_bar = 0.8 * i_bar + 0.2 * sensitivity
            u_bar = 0.6 * u_bar + 0.4 * (sensitivity - i_bar).abs()
        expected[name] = i_bar * u_bar
    scores = expected["lora_E"] + expected["lora_A"].mean(1) + expected["lora_B"].mean(0)
    assert torch.allclose(layer.triplet_scores(), scores, rtol=1e-6, atol=0)


def test_rank_mask_prunes_triplets_and_state_round_trips():
    layer = _layer(3)
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
    layer.set_rank_mask(torch.tensor([1.0, 0.0, 1.0]))
    assert layer.rank == 2 and layer.lora_E[1] == 0
    expected = (layer.lora_B[:, [0, 2]] @ layer.lora_A[[0, 2]]) * (6 / (3 + 1e-5))
    assert torch.allclose(layer.delta_weight(), expected.detach())
    layer(torch.randn(2, 5)).sum().backward()
    layer.update_importance()
    state = layer.importance_state()
    other = _layer(3)
    other.load_importance_state(state)
    assert torch.equal(other.triplet_scores(), layer.triplet_scores())
