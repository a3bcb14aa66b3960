"""``compute_dtype="bf16"`` on CPU: the 4-bit layers multiply in bf16, everything else stays in the model's dtype.

That is bitsandbytes' ``compute_dtype`` (input cast to it, output cast back) rather than autocast
over the whole model: autocast also ran attention, the LoRA factors and every fp32 <-> bf16
round trip of the residual stream in bf16, which made the main job's step slower than fp32 on
this CPU although its bf16 matmuls (AMX) are 2-4x faster (issue 20).
"""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.plugins import FabricNF4Precision, NF4Precision
from lightning_qlora.quantization import Linear4bit, matmul_dtype


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 32))


def _converted(plugin_class: type, dtype: str) -> tuple[torch.nn.Module, object]:
    plugin = plugin_class(mode="nf4-dq", compute_dtype=dtype, adapter=LoRAConfig(r=4, alpha=8), skip_modules=())
    model = plugin.convert_module(_model())
    return model, plugin


@pytest.mark.parametrize("plugin_class", [FabricNF4Precision, NF4Precision])
def test_bf16_on_cpu_multiplies_the_4bit_weights_in_bf16_and_keeps_the_rest_fp32(monkeypatch, plugin_class):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, plugin = _converted(plugin_class, "bf16")
    first = model[0]
    base = first.base if hasattr(first, "base") else first.base_layer
    assert isinstance(base, Linear4bit)
    x = torch.randn(100, 64)  # more rows than the fused GEMV takes: dequantize + BLAS
    assert plugin.convert_input(x).dtype == torch.float32  # inputs keep the model's dtype
    seen: dict[str, torch.Tensor] = {}
    base.register_forward_hook(lambda module, args, out: seen.setdefault("base", out))
    model[1].register_forward_hook(lambda module, args, out: seen.setdefault("norm", out))
    with plugin.forward_context():
        out = model(x)
    assert out.dtype == torch.float32 and seen["norm"].dtype == torch.float32  # no autocast around the rest
    weight = base.weight
    expected = torch.nn.functional.linear(x.bfloat16(), weight.dequantize(torch.bfloat16), base.bias.bfloat16())
    assert seen["base"].dtype == torch.float32
    assert torch.equal(seen["base"], expected.float())


def test_the_input_gradient_is_taken_in_bf16_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, plugin = _converted(FabricNF4Precision, "bf16")
    base = model[2].base if hasattr(model[2], "base") else model[2].base_layer
    x = torch.randn(4, 25, 128, requires_grad=True)
    with plugin.forward_context():
        out = base(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = (grad_out.bfloat16() @ base.weight.dequantize(torch.bfloat16)).float()
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, expected)


def test_fp32_changes_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, plugin = _converted(FabricNF4Precision, "fp32")
    base = model[0].base if hasattr(model[0], "base") else model[0].base_layer
    assert base.compute_dtype is None
    x = torch.randn(100, 64)
    expected = torch.nn.functional.linear(x, base.weight.dequantize(torch.float32), base.bias)
    with plugin.forward_context():
        assert torch.equal(base(x), expected)
    assert torch.equal(base(x), expected)


@pytest.mark.parametrize("plugin_class", [FabricNF4Precision, NF4Precision])
def test_the_converted_layers_keep_bf16_outside_the_trainer(monkeypatch, plugin_class):
    """Evaluation and ``generate`` after ``fit`` run outside the plugin's forward: the layers carry the dtype.

    The app's before/after evaluation and a user's own ``model.generate`` call the converted model
    directly; they multiply in the plugin's compute dtype as bitsandbytes' ``Linear4bit(compute_dtype=...)``
    does. ``matmul_dtype(None)`` still asks for the input's dtype.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = _converted(plugin_class, "bf16")
    base = model[0].base if hasattr(model[0], "base") else model[0].base_layer
    assert base.compute_dtype == torch.bfloat16
    x = torch.randn(100, 64)
    bf16 = torch.nn.functional.linear(x.bfloat16(), base.weight.dequantize(torch.bfloat16), base.bias.bfloat16())
    with torch.no_grad():
        assert torch.equal(base(x), bf16.float())
    fp32 = torch.nn.functional.linear(x, base.weight.dequantize(torch.float32), base.bias)
    with matmul_dtype(None):
        assert torch.equal(base(x), fp32)


def test_a_layer_built_with_a_compute_dtype_uses_it():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(100, 64, requires_grad=True)
    out = layer(x)
    expected = torch.nn.functional.linear(x.bfloat16(), layer.weight.dequantize(torch.bfloat16), layer.bias.bfloat16())
    assert out.dtype == torch.float32 and torch.equal(out, expected.float())
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.int8)


def test_a_resumed_auto_run_gives_the_layers_the_checkpoints_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("lightning_qlora.plugins.nf4_precision.choose_compute_dtype", lambda dtype: torch.float32)
    plugin = NF4Precision(mode="nf4-dq", compute_dtype="auto", adapter=LoRAConfig(r=4, alpha=8), skip_modules=())
    model = plugin.convert_module(_model())
    base = model[0].base if hasattr(model[0], "base") else model[0].base_layer
    assert base.compute_dtype is None  # this process measured fp32
    plugin.load_state_dict({"compute_dtype": "bfloat16"})  # the checkpointed run measured bf16
    assert base.compute_dtype == torch.bfloat16
