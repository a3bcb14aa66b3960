"""torch.compile of a model with 4-bit Linear layers runs and matches eager (forward and backward)."""

from __future__ import annotations

import torch

from lightning_qlora.quantization import Linear4bit


def test_compiled_linear4bit_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Linear4bit.from_linear(torch.nn.Linear(128, 64)),
        torch.nn.ReLU(),
        Linear4bit.from_linear(torch.nn.Linear(64, 32)),
    )
    compiled = torch.compile(model)
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(x_compiled).square().sum().backward()
    model(x_eager).square().sum().backward()
    assert torch.allclose(x_compiled.grad, x_eager.grad, atol=1e-5)
