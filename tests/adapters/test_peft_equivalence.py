"""Same weights, same outputs as PEFT -- on float and on NF4 (bitsandbytes) bases."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lightning_qlora.adapters import AdaLoRAConfig, DoRAConfig, LoRAConfig, VeRAConfig, adapter_layers, inject_adapters
from lightning_qlora.quantization import Linear4bit
from lightning_qlora.quantization.convert import quantize_linears

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj"]


def _to_bnb_4bit(model: nn.Module, ours: nn.Module) -> nn.Module:
    """``model`` with each targeted Linear replaced by a bitsandbytes Linear4bit holding our codes."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name in TARGETS:
        layer: Linear4bit = ours.get_submodule(name)
        state = layer.state_dict()
        replacement = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        stats = {k: v for k, v in state.items() if k.startswith("weight.")}
        replacement.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
        if layer.bias is not None:
            replacement.bias = nn.Parameter(state["bias"].clone())
        setattr(model, name, replacement)
    return model


def _bases(two_proj: nn.Module, nf4: bool) -> tuple[nn.Module, nn.Module]:
    ours = copy.deepcopy(two_proj)
    if not nf4:
        return ours, copy.deepcopy(two_proj)
    quantize_linears(ours, "nf4", 64, double_quant=True)
    return ours, _to_bnb_4bit(two_proj, ours)


def _peft_config(method: str):
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=10)
    if method == "vera":
        return peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=0, save_projection=True)
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=method == "dora")


OUR_CONFIGS = {
    "adalora": AdaLoRAConfig(r=4, alpha=8),
    "lora": LoRAConfig(r=4, alpha=8),
    "dora": DoRAConfig(r=4, alpha=8),
    "vera": VeRAConfig(r=8),
}


def _randomize_and_copy(peft_model: nn.Module, ours: nn.Module, method: str) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            theirs = peft_model.base_model.model.get_submodule(name)
            if method == "vera":
                theirs.vera_lambda_b["default"].normal_()
                theirs.vera_lambda_d["default"].normal_()
                layer.vera_A = theirs.vera_A["default"][:, : layer.in_features].clone()
                layer.vera_B = theirs.vera_B["default"][: layer.out_features, :].clone()
                layer.lambda_b.copy_(theirs.vera_lambda_b["default"])
                layer.lambda_d.copy_(theirs.vera_lambda_d["default"])
                continue
            if method == "adalora":
                theirs.lora_E["default"].normal_()
                layer.lora_A.copy_(theirs.lora_A["default"])
                layer.lora_E.copy_(theirs.lora_E["default"].squeeze(1))
                layer.lora_B.copy_(theirs.lora_B["default"])
                continue
            theirs.lora_B["default"].weight.normal_(std=0.1)
            layer.lora_A.copy_(theirs.lora_A["default"].weight)
            layer.lora_B.copy_(theirs.lora_B["default"].weight)
            if method == "dora":
                theirs.lora_magnitude_vector["default"].weight.mul_(
                    torch.rand_like(theirs.lora_magnitude_vector["default"].weight) + 0.5
                )
                layer.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("nf4", [False, True], ids=["float-base", "nf4-base"])
@pytest.mark.parametrize("method", ["lora", "dora", "vera", "adalora"])
def test_outputs_equal_peft(two_proj, method, nf4):
    ours, theirs_base = _bases(two_proj, nf4)
    inject_adapters(ours, OUR_CONFIGS[method], TARGETS)
    peft_model = peft.get_peft_model(theirs_base, _peft_config(method))
    _randomize_and_copy(peft_model, ours, method)
    x = torch.randn(6, 128)
    with torch.no_grad():
        expected = peft_model(x)
        actual = ours(x)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()


def test_lora_training_on_the_nf4_base_follows_peft_and_bitsandbytes_step_by_step(two_proj):
    # the main job's NF4 arms differ only in implementation: the same AdamW steps with gradient
    # clipping from the same weights give the same losses and adapters (train mode, no dropout)
    ours, theirs_base = _bases(two_proj, nf4=True)
    inject_adapters(ours, LoRAConfig(r=4, alpha=8), TARGETS)
    peft_model = peft.get_peft_model(theirs_base, _peft_config("lora"))
    _randomize_and_copy(peft_model, ours, "lora")
    runs = []
    for model in (ours, peft_model):
        params = [p for p in model.parameters() if p.requires_grad]
        runs.append((model.train(), params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)))
    data = torch.Generator().manual_seed(2)
    for _ in range(10):
        x, target = torch.randn(6, 128, generator=data), torch.randn(6, 16, generator=data)
        losses = []
        for model, params, optimizer in runs:
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, layer in adapter_layers(ours).items():
        theirs = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A, theirs.lora_A["default"].weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B, theirs.lora_B["default"].weight, rtol=1e-4, atol=1e-6)
