"""Adapters saved alone round-trip exactly; PEFT's layout goes both ways; bad files fail clearly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lightning_qlora.adapters import (
    AdaLoRAConfig,
    AdapterConfigError,
    DoRAConfig,
    LoRAConfig,
    LoRAFAConfig,
    VeRAConfig,
    adapter_layers,
    export_peft,
    import_peft,
    inject_adapters,
    load_adapters,
    save_adapters,
)
from lightning_qlora.quantization.convert import quantize_linears

peft = pytest.importorskip("peft")


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    for layer in adapter_layers(model).values():
        for p in layer.parameters():
            if p.requires_grad:
                p.data.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(
    "config",
    [LoRAConfig(r=4), DoRAConfig(r=4), VeRAConfig(r=8), LoRAFAConfig(r=4), AdaLoRAConfig(r=4)],
    ids=lambda c: c.method,
)
def test_save_load_round_trip_on_nf4_base(two_proj, tmp_path, config):
    base = copy.deepcopy(two_proj)
    quantize_linears(base, skip=("lm_head",))
    trained = copy.deepcopy(base)
    inject_adapters(trained, config, ["q_proj", "v_proj"])
    _perturb(trained)
    save_adapters(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    restored = copy.deepcopy(base)
    load_adapters(restored, tmp_path)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(restored(x), trained(x))


@pytest.mark.parametrize(
    "config",
    [LoRAConfig(r=4, alpha=8), DoRAConfig(r=4, alpha=8), AdaLoRAConfig(r=4, alpha=8), VeRAConfig(r=8, seed=3)],
    ids=lambda c: c.method,
)
def test_exports_to_peft_and_peft_reproduces_our_outputs(two_proj, tmp_path, config):
    ours = copy.deepcopy(two_proj)
    inject_adapters(ours, config, ["q_proj", "v_proj"])
    _perturb(ours)
    if config.method == "adalora":  # a pruned rank must export as a zero singular value
        adapter_layers(ours)["q_proj"].set_rank_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(two_proj), tmp_path)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    back = copy.deepcopy(two_proj)
    import_peft(back, tmp_path)
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-6)


def test_peft_adapter_imports_into_ours(two_proj, tmp_path):
    theirs = peft.get_peft_model(
        copy.deepcopy(two_proj), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    )
    with torch.no_grad():
        theirs.base_model.model.q_proj.lora_B["default"].weight.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(two_proj)
    assert import_peft(ours, tmp_path) == ["q_proj"]
    assert type(adapter_layers(ours)["q_proj"]).__name__ == "DoRALayer"
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_loading_into_the_wrong_shape_or_method_fails_clearly(two_proj, tmp_path):
    trained = copy.deepcopy(two_proj)
    inject_adapters(trained, LoRAConfig(r=4), ["q_proj"])
    save_adapters(trained, tmp_path)
    with pytest.raises(AdapterConfigError, match="saved for method 'lora', not 'dora'"):
        load_adapters(copy.deepcopy(two_proj), tmp_path, expected_method="dora")
    other = copy.deepcopy(two_proj)
    inject_adapters(other, LoRAConfig(r=2), ["q_proj"])
    with pytest.raises(AdapterConfigError, match=r"differ from the ones saved.*r: 4 saved, 2 here"):
        load_adapters(other, tmp_path)


def test_damaged_adapter_files(two_proj, tmp_path):
    trained = copy.deepcopy(two_proj)
    inject_adapters(trained, LoRAConfig(r=4), ["q_proj"])
    save_adapters(trained, tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterConfigError, match="cannot read adapter weights"):
        load_adapters(copy.deepcopy(two_proj), tmp_path)
    (tmp_path / "adapter.json").write_text("{oops")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        load_adapters(copy.deepcopy(two_proj), tmp_path)
    meta = {"format": "lightning_qlora", "config": {"method": "lora", "r": 4, "rank_typo": 3}, "targets": ["q_proj"]}
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterConfigError, match=r"unknown config field\(s\) \['rank_typo'\]"):
        load_adapters(copy.deepcopy(two_proj), tmp_path)


def test_peft_vera_imports_and_survives_our_save_load(two_proj, tmp_path):
    theirs = peft.get_peft_model(
        copy.deepcopy(two_proj), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=True)
    )
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            theirs.base_model.model.get_submodule(name).vera_lambda_b["default"].normal_()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(two_proj)
    import_peft(ours, tmp_path / "peft")
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    save_adapters(ours, tmp_path / "ours")
    again = copy.deepcopy(two_proj)
    load_adapters(again, tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
