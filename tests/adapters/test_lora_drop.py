"""LoRA-drop layer state: importance accumulator and sharing between dropped layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_qlora.adapters import (
    AdapterConfigError,
    LoRADropConfig,
    adapter_layers,
    apply_lora_drop,
    inject_adapters,
    trainable_parameter_count,
)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Stack()
    inject_adapters(model, LoRADropConfig(r=2, alpha=2), "layers.*")
    for layer in adapter_layers(model).values():
        layer.lora_B.data.normal_()
    return model


def test_importance_is_the_mean_squared_norm_of_the_update():
    model = _model()
    layer = adapter_layers(model)["layers.0"]
    layer.tracking = True
    x = torch.randn(2, 3, 16)
    model.train()
    model(x)
    expected = (x.reshape(-1, 16) @ (layer.lora_B @ layer.lora_A).T).square().sum(-1).mean()
    assert layer.importance() == pytest.approx(expected.item(), rel=1e-6)
    layer.reset_importance()
    assert layer.importance() == 0.0


def test_dropped_layers_share_one_adapter_initialized_from_their_mean():
    model = _model()
    layers = adapter_layers(model)
    mean_a = torch.stack([layers[f"layers.{i}"].lora_A.detach() for i in (1, 3)]).mean(0)
    result = apply_lora_drop(model, keep=["layers.0", "layers.2"])
    assert result == {"kept": ["layers.0", "layers.2"], "dropped": ["layers.1", "layers.3"]}
    assert layers["layers.1"].shared is layers["layers.3"].shared is model.lora_drop_shared["16x16"]
    assert torch.equal(model.lora_drop_shared["16x16"].lora_A, mean_a)
    # 2 kept layers * r(d+k) + one shared adapter of the same size
    assert trainable_parameter_count(model) == 3 * 2 * (16 + 16)
    model(torch.randn(4, 16)).sum().backward()
    assert model.lora_drop_shared["16x16"].lora_A.grad is not None
    assert layers["layers.1"].lora_A.grad is None


def test_keep_must_name_lora_drop_layers():
    with pytest.raises(AdapterConfigError, match="layers.9"):
        apply_lora_drop(_model(), keep=["layers.9"])
