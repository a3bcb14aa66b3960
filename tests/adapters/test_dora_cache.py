"""DoRA's weight-norm cache (issue 18): used outside training, never stale.

The reference is a fresh computation, ``||W0 + s B A||_row`` from the current tensors, through
the uncached ``_weight_norm`` and the DoRA formula.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_qlora.adapters.dora import DoRAConfig, DoRALayer
from lightning_qlora.quantization import Linear4bit


def _layer(quantized: bool = True) -> DoRALayer:
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    if quantized:
        base = Linear4bit.from_linear(base)
    layer = DoRALayer(base, DoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero update, so the norm depends on A and B
    return layer


def _fresh_forward(layer: DoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The DoRA output computed from scratch (no cache), as the forward computes it."""
    with torch.no_grad():
        base_out = layer.base(x)
        scale = (layer.lora_magnitude / layer._weight_norm()).to(x.dtype)
        bias = layer.base.bias
        without_bias = base_out - bias if bias is not None else base_out
        lora = super(DoRALayer, layer).delta(x, base_out)  # LoRA's scaled update (no dropout: p = 0)
        assert torch.allclose(lora, layer.lora_out(x) * layer.scaling, rtol=1e-5, atol=1e-6)
        return base_out + ((scale - 1) * without_bias + scale * lora)


def _count_norms(layer: DoRALayer, monkeypatch) -> list[int]:
    calls = []
    original = layer._weight_norm

    def counting():
        calls.append(1)
        return original()

    monkeypatch.setattr(layer, "_weight_norm", counting)
    return calls


@pytest.mark.parametrize("quantized", [True, False])
def test_eval_forwards_compute_the_norm_once(quantized, monkeypatch):
    layer = _layer(quantized).eval()
    calls = _count_norms(layer, monkeypatch)
    x = torch.randn(3, 64)
    with torch.no_grad():
        outputs = [layer(x) for _ in range(4)]
    assert len(calls) == 1
    assert all(torch.equal(o, outputs[0]) for o in outputs)


def test_no_grad_in_train_mode_is_cached_too_and_training_forwards_are_not(monkeypatch):
    layer = _layer().train()
    calls = _count_norms(layer, monkeypatch)
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x), layer(x)
    assert len(calls) == 1
    layer(x), layer(x)
    assert len(calls) == 3


@pytest.mark.parametrize("quantized", [True, False])
def test_a_training_step_changes_the_norm_and_the_next_eval_forward_sees_it(quantized):
    layer = _layer(quantized)
    x = torch.randn(5, 64)
    layer.eval()
    with torch.no_grad():
        before_norm = layer._weight_norm()
        assert torch.equal(layer(x), _fresh_forward(layer, x))  # fills the cache
    layer.train()
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    layer(x).square().sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        assert not torch.equal(layer._weight_norm(), before_norm)  # the step changed the norm
        assert torch.equal(layer(x), _fresh_forward(layer, x))


def test_loading_other_adapter_weights_invalidates_the_cache():
    layer, other = _layer(), _layer()
    with torch.no_grad():
        other.lora_A.mul_(3.0)
    x = torch.randn(2, 64)
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), _fresh_forward(layer, x))
        layer.lora_B.add_(1.0)  # any in-place edit bumps the version
        assert torch.equal(layer(x), _fresh_forward(layer, x))
