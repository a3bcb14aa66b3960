"""Issue 13, points 3-8 and 10: what a user of the plugin met on 5057988, each pinned to a reference."""

from __future__ import annotations

import copy
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn

from lightning_qlora.adapters import (
    AdaLoRAConfig,
    AdapterConfigError,
    CapabilityError,
    DeltaLoRAConfig,
    LoRAConfig,
    LoRADropConfig,
    adapter_layers,
    apply_lora_drop,
    export_peft,
    import_peft,
    inject_adapters,
)
from lightning_qlora.errors import LightningQLoRAError, NonFiniteError
from lightning_qlora.plugins import CheckpointMismatchError, NF4Precision
from lightning_qlora.quantization import Linear4bit
from tests.adapters.conftest import TwoProj

peft = pytest.importorskip("peft")


def _two_proj() -> TwoProj:
    torch.manual_seed(0)
    return TwoProj()


def _same_model(a: nn.Module, b: nn.Module) -> bool:
    types_equal = [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    sa, sb = a.state_dict(), b.state_dict()
    return types_equal and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- point 3: PEFT exports of Delta-LoRA and LoRA-drop ------------------------------------------------


def test_delta_lora_peft_export_is_refused_with_the_alternative(tmp_path):
    model = _two_proj()
    inject_adapters(model, DeltaLoRAConfig(r=4), "all-linear")
    with pytest.raises(CapabilityError, match="Delta-LoRA.*export_merged"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()  # nothing half-written


def test_lora_drop_exports_the_adapter_each_layer_really_uses(tmp_path):
    model = _two_proj()
    model.v_proj = nn.Linear(64, 128)  # a second layer of q_proj's transposed shape would not share; make two alike
    model.k_proj = nn.Linear(128, 64)
    inject_adapters(model, LoRADropConfig(r=4, alpha=8), ["q_proj", "k_proj", "v_proj"])
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_()
    apply_lora_drop(model, keep=["v_proj"])  # q_proj and k_proj now share one (mean) adapter
    with torch.no_grad():
        model.lora_drop_shared["128x64"].lora_B.add_(1.0)  # the shared pair moved on in stage 2
    export_peft(model, tmp_path)
    base = _two_proj()
    base.v_proj, base.k_proj = copy.deepcopy(model.v_proj.base), copy.deepcopy(model.k_proj.base)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    x = torch.randn(5, 128)
    # the block's forward does not call k_proj: check it layer by layer too
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)
    peft_k = theirs.base_model.model.k_proj
    torch.testing.assert_close(peft_k(x), model.k_proj(x), rtol=1e-5, atol=1e-5)


# -- point 4: quantize-only mode ------------------------------------------------------------------------


def test_adapter_none_quantizes_and_freezes_only():
    model = _two_proj()
    NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=None).convert_module(model)
    assert not adapter_layers(model)
    assert isinstance(model.q_proj, Linear4bit) and isinstance(model.v_proj, Linear4bit)
    assert isinstance(model.lm_head, nn.Linear)  # skip_modules
    assert not any(p.requires_grad for p in model.parameters())
    assert NF4Precision().spec.adapter == LoRAConfig(r=16, alpha=32)  # the default stays LoRA r=16, explicitly


# -- point 5: a failed conversion leaves the model as it was -------------------------------------------


def test_unknown_targets_leave_the_model_unchanged_and_name_the_real_layers():
    model, reference = _two_proj(), _two_proj()
    with pytest.raises(
        AdapterConfigError, match=r"matched no Linear layer.*Linear layers in this model: q_proj, v_proj"
    ):
        NF4Precision(mode="nf4", target_modules=["nothing"]).convert_module(model)
    assert _same_model(model, reference)
    assert all(p.requires_grad for p in model.parameters())


def test_a_nan_weight_names_its_layer_and_changes_nothing():
    model = _two_proj()
    with torch.no_grad():
        model.v_proj.weight[3, 5] = float("nan")
    reference = copy.deepcopy(model)
    with pytest.raises(NonFiniteError, match=r"v_proj\.weight.*Nothing was converted.*skip_modules") as caught:
        NF4Precision(mode="nf4-dq").convert_module(model)
    assert "check_finite=" not in str(caught.value)
    assert isinstance(caught.value, LightningQLoRAError)
    sa, sb = model.state_dict(), reference.state_dict()
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(torch.equal(sa[k], sb[k]) or (sa[k].isnan() == sb[k].isnan()).all() for k in sa)


# -- point 6: a rank above a small layer's size ----------------------------------------------------------


class WithSmallHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(32, 13)
        self.head = nn.Linear(13, 7)  # a 13 -> 7 projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_rank_above_a_layers_size_is_accepted_like_peft():
    torch.manual_seed(0)
    ours = WithSmallHead()
    theirs = peft.get_peft_model(
        copy.deepcopy(ours), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["body", "head"])
    )
    with pytest.warns(UserWarning, match=r"r=16 exceeds min\(in, out\) of 2 layer\(s\) \(body, head\)"):
        NF4Precision(
            mode="none", compute_dtype="fp32", adapter=LoRAConfig(r=16, alpha=32), skip_modules=()
        ).convert_module(ours)
    for name in ("body", "head"):  # same factors -> same outputs as PEFT with the same r
        layer = adapter_layers(ours)[name]
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


# -- point 7: strategies registered by `import lightning_qlora` -----------------------------------------


def test_import_lightning_qlora_registers_our_strategies_without_importing_lightning():
    code = (
        "import sys, lightning_qlora\n"
        "assert 'lightning.pytorch' not in sys.modules, 'importing lightning_qlora imported Lightning'\n"
        "import lightning as L\n"
        "for name, cls in [('paged', 'PagedStrategy'), ('paged_ddp', 'PagedDDPStrategy'), ('qlora_fsdp', 'QLoRAFSDPStrategy')]:\n"
        "    trainer = L.Trainer(strategy=name, accelerator='cpu', devices=1, logger=False)\n"
        "    assert type(trainer.strategy).__name__ == cls, (name, type(trainer.strategy))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# -- point 8: resuming with other settings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters_only_checkpoint(tmp_path_factory):
    from tests.callbacks.tiny import TinyLlamaQLoRA, trainer

    directory = tmp_path_factory.mktemp("adapters_only")
    module = TinyLlamaQLoRA()
    module.adapters_only_checkpoints, module.strict_loading = True, False
    plugin = NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8.0))
    trainer(max_steps=2, plugins=[plugin]).fit(module)
    path = directory / "adapters.ckpt"
    module.trainer.save_checkpoint(path)
    assert not any(".base." in key for key in torch.load(path, weights_only=True)["state_dict"])
    return path


@pytest.mark.parametrize(
    ("plugin_args", "message"),
    [
        (
            {"adapter": LoRAConfig(r=4, alpha=16.0)},
            r"adapter alpha: 8\.0 saved, 16\.0 here.*LoRAConfig\(.*alpha=8\.0.*adapter\.alpha=8\.0",
        ),
        (
            {"mode": "fp4", "adapter": LoRAConfig(r=4, alpha=8)},
            r"mode: 'nf4-dq' saved, 'fp4' here.*mode='nf4-dq'.*quant=nf4_dq",
        ),
        ({"adapter": AdaLoRAConfig(r=4)}, r"adapter method: 'lora' saved, 'adalora' here.*adapter=lora"),
        ({"adapter": LoRAConfig(r=8, alpha=8)}, r"adapter r: 4 saved, 8 here.*adapter\.r=4"),
    ],
)
def test_resuming_an_adapters_only_checkpoint_with_other_settings_is_a_typed_error(
    adapters_only_checkpoint, plugin_args, message
):
    from tests.callbacks.tiny import TinyLlamaQLoRA, trainer

    module = TinyLlamaQLoRA()
    module.adapters_only_checkpoints, module.strict_loading = True, False
    reference = copy.deepcopy(module.model)
    plugin = NF4Precision(**{"compute_dtype": "fp32", **plugin_args})
    with pytest.raises(CheckpointMismatchError, match=message):
        trainer(max_steps=4, plugins=[plugin]).fit(module, ckpt_path=str(adapters_only_checkpoint))
    assert module.losses == []
    assert _same_model(module.model, reference)  # refused before the model was converted


def test_resuming_a_full_checkpoint_with_another_alpha_is_refused(tmp_path):
    from tests.plugins.test_plain_module import UserModule

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
        plugins=[NF4Precision(compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=8))],
    ).fit(UserModule())
    with pytest.raises(CheckpointMismatchError, match=r"alpha: 8 saved, 4 here"):
        L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=4,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=[NF4Precision(compute_dtype="fp32", adapter=LoRAConfig(r=4, alpha=4))],
        ).fit(UserModule(), ckpt_path=str(next(tmp_path.glob("*.ckpt"))))


# -- point 10: a pruned (rank_pattern) PEFT AdaLoRA adapter --------------------------------------------


def test_pruned_peft_adalora_adapter_imports_with_peft_logits(tmp_path):
    model = _two_proj()
    config = peft.AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=10, tinit=1, tfinal=1
    )
    trained = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    # a pruned allocation, as update_and_allocate leaves it: per-layer kept ranks 4 and 1
    trained.peft_config["default"].rank_pattern = {
        "q_proj.lora_E.default": [True, False, True, True, False, True],
        "v_proj.lora_E.default": [False, False, True, False, False, False],
    }
    trained.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert reloaded.base_model.model.q_proj.lora_E["default"].shape[0] == 4  # PEFT resized by the pattern
    ours = copy.deepcopy(model)
    import_peft(ours, tmp_path)
    layers = adapter_layers(ours)
    assert layers["q_proj"].rank == 4 and layers["v_proj"].rank == 1
    x = torch.randn(7, 128)
    torch.testing.assert_close(ours(x), reloaded(x), rtol=1e-5, atol=1e-5)


# -- capabilities are asked of the method, and agree between the in-memory layer and the saved state ----


@pytest.mark.parametrize(
    "method", ["lora", "lora_plus", "lora_fa", "lora_drop", "dora", "vera", "adalora", "delta_lora", "moe_lora"]
)
def test_serving_factors_agree_between_layer_and_saved_state(method):
    from lightning_qlora.adapters import ADAPTER_CONFIGS
    from lightning_qlora.adapters.io import adapter_state_dict

    config = ADAPTER_CONFIGS[method](r=4)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 6))
    inject_adapters(model, config, "all-linear", exclude=())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_()
    if method == "lora_drop":
        apply_lora_drop(model, keep=["1"])  # layers 0 and 2 (8 -> 6) share
    state = adapter_state_dict(model)
    for name, layer in adapter_layers(model).items():
        try:
            expected = layer.lora_factors()
        except CapabilityError:
            with pytest.raises(CapabilityError):
                config.lora_factors_from_state(name, state)
            continue
        if method == "vera":  # its seeded projections are not in the file: the saved state alone cannot serve it
            with pytest.raises(CapabilityError):
                config.lora_factors_from_state(name, state)
            got = expected
        else:
            got = config.lora_factors_from_state(name, state)
        x = torch.randn(3, layer.in_features)
        delta = lambda f: f.scale * (x @ f.lora_A.T @ f.lora_B.T)  # noqa: E731
        torch.testing.assert_close(delta(got), delta(expected))
        torch.testing.assert_close(delta(expected), layer(x) - layer.base(x), rtol=1e-5, atol=1e-5)
