"""Per-method behaviour: identity at init, gradient flow, parameter counts, merge, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_qlora.adapters import (
    LoRADropConfig,
    MixtureLoRAConfig,
    DeltaLoRAConfig,
    AdaLoRAConfig,
    AdapterConfigError,
    DoRAConfig,
    LoRAConfig,
    LoRAFAConfig,
    LoRAPlusConfig,
    VeRAConfig,
    adapter_layers,
    adapter_param_groups,
    adapter_summary,
    inject_adapters,
    trainable_parameter_count,
)
from lightning_qlora.quantization.convert import quantize_linears

CONFIGS = {
    "lora": LoRAConfig(r=4, alpha=8),
    "lora_plus": LoRAPlusConfig(r=4, alpha=8, lr_ratio=16),
    "lora_fa": LoRAFAConfig(r=4, alpha=8),
    "dora": DoRAConfig(r=4, alpha=8),
    "vera": VeRAConfig(r=16),
    "adalora": AdaLoRAConfig(r=6, alpha=8),
    "delta_lora": DeltaLoRAConfig(r=4, alpha=8),
    "moe_lora": MixtureLoRAConfig(r=2, alpha=4, num_experts=3, top_k=2),
    "lora_drop": LoRADropConfig(r=4, alpha=8),
}
# Closed forms per adapted layer (in = d, out = k): the table.
TRAINABLE = {
    "lora": lambda d, k, c: c.r * (d + k),
    "lora_plus": lambda d, k, c: c.r * (d + k),
    "lora_fa": lambda d, k, c: c.r * k,
    "dora": lambda d, k, c: c.r * (d + k) + k,
    "vera": lambda d, k, c: c.r + k,
    "adalora": lambda d, k, c: c.r * (d + k + 1),
    "delta_lora": lambda d, k, c: c.r * (d + k),
    "moe_lora": lambda d, k, c: c.num_experts * (c.r * (d + k) + d),
    "lora_drop": lambda d, k, c: c.r * (d + k),
}
# Which adapter parameters receive gradients.
GRADIENTS = {
    "lora": {"lora_A", "lora_B"},
    "lora_plus": {"lora_A", "lora_B"},
    "lora_fa": {"lora_B"},
    "dora": {"lora_A", "lora_B", "lora_magnitude"},
    "vera": {"lambda_d", "lambda_b"},
    "adalora": {"lora_A", "lora_E", "lora_B"},
    "delta_lora": {"lora_A", "lora_B"},
    "moe_lora": {"lora_A", "lora_B", "router"},
    "lora_drop": {"lora_A", "lora_B"},
}


@pytest.mark.parametrize("nf4", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_fresh_adapter_is_exactly_the_base(two_proj, clone, method, nf4):
    base = clone(two_proj)
    if nf4:
        quantize_linears(base, skip=())
    adapted = clone(base)
    inject_adapters(adapted, CONFIGS[method], ["q_proj", "v_proj"])
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_only_intended_parameters_get_gradients(two_proj, method):
    quantize_linears(two_proj, skip=("lm_head",))
    inject_adapters(two_proj, CONFIGS[method], ["q_proj", "v_proj"])
    for layer in adapter_layers(two_proj).values():  # move off the zero init so every path carries gradient
        for p in layer.trainable_parameters():
            p.data.add_(0.01)
    two_proj(torch.randn(3, 128)).square().sum().backward()
    got = {name.rpartition(".")[2] for name, p in two_proj.named_parameters() if p.grad is not None}
    assert got == GRADIENTS[method]
    assert all(not p.requires_grad for n, p in two_proj.named_parameters() if "lm_head" in n or ".base." in n)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainable_counts_match_closed_forms(two_proj, method):
    config = CONFIGS[method]
    inject_adapters(two_proj, config, ["q_proj", "v_proj"])
    expected = TRAINABLE[method](128, 64, config) + TRAINABLE[method](64, 128, config)
    assert trainable_parameter_count(two_proj) == expected
    summary = adapter_summary(two_proj)
    assert f"trainable {expected:,} of" in summary and "q_proj" in summary


def test_lora_plus_groups_give_b_a_faster_learning_rate(two_proj):
    inject_adapters(two_proj, CONFIGS["lora_plus"], ["q_proj"])
    groups = adapter_param_groups(two_proj, lr=1e-3)
    layer = adapter_layers(two_proj)["q_proj"]
    assert groups == [{"params": [layer.lora_A], "lr": 1e-3}, {"params": [layer.lora_B], "lr": 1.6e-2}]
    torch.optim.AdamW(groups)  # any torch optimizer takes them


@pytest.mark.parametrize("method", [m for m in CONFIGS if m != "moe_lora"])
def test_merge_and_unmerge_on_float_base(two_proj, method):
    inject_adapters(two_proj, CONFIGS[method], ["q_proj", "v_proj"])
    for layer in adapter_layers(two_proj).values():
        for p in layer.trainable_parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 128)
    with torch.no_grad():
        before = two_proj(x)
        weights = {n: l.base.weight.detach().clone() for n, l in adapter_layers(two_proj).items()}
        reports = [layer.merge() for layer in adapter_layers(two_proj).values()]
        merged = two_proj(x)
        for layer in adapter_layers(two_proj).values():
            layer.unmerge()
        after = two_proj(x)
    assert all(r.max_abs_error == 0.0 for r in reports)
    assert torch.allclose(merged, before, atol=1e-5)
    assert torch.equal(after, before)
    assert all(torch.equal(l.base.weight, weights[n]) for n, l in adapter_layers(two_proj).items())


def test_merge_into_nf4_reports_the_requantization_error(two_proj):
    quantize_linears(two_proj, skip=("lm_head",))
    inject_adapters(two_proj, LoRAConfig(r=4, alpha=8), ["q_proj"])
    layer = adapter_layers(two_proj)["q_proj"]
    layer.lora_B.data.normal_(std=0.05)
    report = layer.merge()
    assert report.max_abs_error > 0 and 0 < report.relative_error < 5
    layer.unmerge()
    assert not layer.merged


@pytest.mark.parametrize(
    ("config_factory", "match"),
    [
        (lambda: LoRAConfig(r=0), "positive integer"),
        (lambda: LoRAConfig(r=-2), "positive integer"),
        (lambda: LoRAConfig(r=3, dropout=1.5), "dropout"),
        (lambda: LoRAPlusConfig(r=2, lr_ratio=0), "lr_ratio"),
        (lambda: VeRAConfig(r=0), "positive integer"),
    ],
)
def test_bad_configs(config_factory, match):
    with pytest.raises(AdapterConfigError, match=match):
        config_factory()


def test_rank_larger_than_layer_is_accepted_per_layer_like_peft(two_proj):
    # issue 13 point 6: PEFT accepts r > min(in, out); so do we, with one warning naming the layer
    with pytest.warns(UserWarning, match=r"r=65 exceeds min\(in, out\) of 2 layer\(s\) \(q_proj, v_proj\)"):
        names = inject_adapters(two_proj, LoRAConfig(r=65), "all-linear")
    assert names == ["q_proj", "v_proj"]
    layer = adapter_layers(two_proj)["q_proj"]
    assert layer.lora_A.shape == (65, 128) and layer.lora_B.shape == (64, 65)
    x = torch.randn(3, 128)
    torch.testing.assert_close(two_proj(x), two_proj(x))  # runs; B = 0 so still the base's output


def test_unknown_targets_list_the_real_names(two_proj):
    with pytest.raises(AdapterConfigError, match="matched no Linear layer.*q_proj, v_proj"):
        inject_adapters(two_proj, LoRAConfig(r=2), ["k_proj"])


def test_target_matching_styles(two_proj, clone):
    assert inject_adapters(clone(two_proj), LoRAConfig(r=2), "all-linear") == ["q_proj", "v_proj"]
    assert inject_adapters(clone(two_proj), LoRAConfig(r=2), "re:(q|v)_proj") == ["q_proj", "v_proj"]
    assert inject_adapters(clone(two_proj), LoRAConfig(r=2), ["v_*"]) == ["v_proj"]
    assert inject_adapters(clone(two_proj), LoRAConfig(r=2), "all-linear", exclude=()) == [
        "q_proj",
        "v_proj",
        "lm_head",
    ]


def test_adapters_require_linear_layers():
    with pytest.raises(AdapterConfigError, match="Conv1d"):
        LoRAConfig(r=2).build(nn.Conv1d(3, 3, 1))
