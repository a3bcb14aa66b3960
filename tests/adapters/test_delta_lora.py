"""Delta-LoRA: exact base updates on float bases, unbiased folds into 4-bit bases."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_qlora.adapters import DeltaLoRAConfig, adapter_layers, delta_lora_step, inject_adapters, save_adapters
from lightning_qlora.quantization import Linear4bit, quantize_4bit


def test_float_base_moves_by_lambda_times_the_product_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    w0 = model[0].weight.detach().clone()
    inject_adapters(model, DeltaLoRAConfig(r=4, alpha=8, delta_scale=2.0), "all-linear")
    layer = adapter_layers(model)["0"]
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    optimizer = torch.optim.SGD(layer.trainable_parameters(), lr=0.1)
    for _ in range(5):
        loss = model(torch.randn(8, 32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert delta_lora_step(model) == 1
    expected = w0 + 2.0 * layer.scaling * (layer.lora_B @ layer.lora_A - b0 @ a0)
    assert torch.allclose(layer.base.weight, expected.detach(), atol=1e-6)
    assert not torch.equal(layer.base.weight, w0)


def test_nf4_fold_is_unbiased_and_pending_update_is_applied_between_folds():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    base = Linear4bit.from_linear(dense, "nf4", 64, double_quant=False)
    config = DeltaLoRAConfig(r=2, alpha=2, delta_scale=1.0, fold_every=1)
    template = config.build(base)
    with torch.no_grad():  # an update far below the 4-bit step, which nearest rounding would lose
        template.lora_B.copy_(torch.randn(64, 2) * 1e-2)
        template.lora_A.copy_(torch.randn(2, 128) * 1e-1)
    before = template.base.weight.dequantize()
    update = template.pending_weight()
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(
            template(x), x @ (before + update + template.delta_weight() - update).T + dense.bias, atol=1e-5
        )
    folded = []
    for seed in range(300):
        layer = copy.deepcopy(template)
        layer.config = DeltaLoRAConfig(r=2, alpha=2, delta_scale=1.0, fold_every=1, seed=seed)
        layer.after_optimizer_step()
        folded.append(layer.base.weight.dequantize() - before)
    mean = torch.stack(folded).mean(0)
    # standard error of the mean <= half a code step (~0.15 * absmax) / sqrt(300); relative to |update|:
    assert (mean - update).abs().mean() < 0.2 * update.abs().mean()
    requantized = quantize_4bit(before + update, double_quant=False).dequantize()
    assert (requantized - before - update).abs().mean() > 0.5 * update.abs().mean()  # nearest loses most of it


def test_saved_delta_lora_adapter_carries_the_moved_base(tmp_path):
    from lightning_qlora.adapters import load_adapters
    from lightning_qlora.quantization.convert import quantize_linears

    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    quantize_linears(fresh, skip=())
    model = copy.deepcopy(fresh)
    inject_adapters(model, DeltaLoRAConfig(r=2, fold_every=1), "all-linear")
    layer = adapter_layers(model)["0"]
    layer.lora_B.data.normal_(std=0.05)
    delta_lora_step(model)
    save_adapters(model, tmp_path)
    restored = copy.deepcopy(fresh)
    load_adapters(restored, tmp_path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert torch.equal(adapter_layers(restored)["0"].base.weight.packed, layer.base.weight.packed)
