"""The fused LoRA update and the cheap adapter dropout (issue 20), pinned to torch's own composition."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.adapters.lora_fa import LoRAFAConfig
from lightning_qlora.quantization import Linear4bit

# imported lazily so that, run against the code before issue 20, the layer-level tests fail on behaviour
try:
    from lightning_qlora.adapters.lora_function import AdapterDropout, dropout_mask, lora_update
except ImportError:
    pass


def _reference(x, lora_A, lora_B, scaling, mask=None, keep=1.0):
    dropped = x if mask is None else x * mask / keep
    return torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B) * scaling


def _grads(fn, x, lora_A, lora_B, grad_out):
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, lora_A, lora_B)]
    out = fn(*tensors)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_lora_update_matches_torch_composition(with_mask, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    lora_A, lora_B = torch.randn(4, 24, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    mask, keep = dropout_mask(x.shape, 0.3, "cpu") if with_mask else (None, 1.0)
    grad_out = torch.randn(*shape[:-1], 12)
    ours, ours_grads = _grads(lambda x, a, b: lora_update(x, a, b, 0.75, mask, keep), x, lora_A, lora_B, grad_out)
    ref, ref_grads = _grads(lambda x, a, b: _reference(x, a, b, 0.75, mask, keep), x, lora_A, lora_B, grad_out)
    torch.testing.assert_close(ours, ref)
    for mine, theirs in zip(ours_grads, ref_grads):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float64])
def test_lora_update_adds_the_base_output_inside_the_product_with_its_gradient(base_dtype):
    # LoRALayer passes its base layer's output in: base_out + update as one addmm (issue 20), or, where the
    # dtypes differ, as base_out + update with the usual promotion
    torch.manual_seed(3)
    x = torch.randn(2, 5, 24)
    lora_A, lora_B = torch.randn(4, 24), torch.randn(12, 4)
    base_out = torch.randn(2, 5, 12, dtype=base_dtype)
    mask, keep = dropout_mask(x.shape, 0.3, "cpu")
    grad_out = torch.randn(2, 5, 12, dtype=base_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, base_out)]
    fused = lora_update(*leaves[:3], 0.75, mask, keep, base_out=leaves[3])
    fused.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, base_out)]
    ref = ref_leaves[3] + _reference(*ref_leaves[:3], 0.75, mask, keep)
    ref.backward(grad_out)
    assert fused.dtype == ref.dtype == base_dtype
    close = {"rtol": 1e-5, "atol": 1e-5}  # fp32 products (the scale on the hidden), compared in base_dtype
    torch.testing.assert_close(fused, ref, **close)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, **close)
    torch.testing.assert_close(leaves[3].grad, grad_out, rtol=0, atol=0)  # the base output's gradient passes through


def test_lora_update_gradcheck_in_double():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    lora_A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    mask, keep = dropout_mask(x.shape, 0.25, "cpu")
    assert torch.autograd.gradcheck(lambda x, a, b: lora_update(x, a, b, 1.5, mask, keep), (x, lora_A, lora_B))


def test_lora_update_skips_frozen_factors_and_casts_to_the_input_dtype():
    torch.manual_seed(2)
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    lora_A, lora_B = torch.randn(2, 8), torch.randn(3, 2, requires_grad=True)  # A frozen (LoRA-FA)
    out = lora_update(x, lora_A, lora_B, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lora_A.grad is None and lora_B.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = _reference(x.detach().float(), lora_A, lora_B.detach(), 2.0)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="does not match the input"):
        lora_update(x, lora_A, lora_B, 2.0, torch.ones(4, 7, dtype=torch.bool), 1.0)


def test_lora_update_under_cpu_autocast_runs_in_bf16_like_f_linear():
    torch.manual_seed(8)
    x = torch.randn(3, 5, 16, requires_grad=True)  # fp32 input, fp32 factors, bf16 autocast (compute_dtype=bf16)
    lora_A, lora_B = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    mask, keep = dropout_mask(x.shape, 0.1, "cpu")
    grad_out = torch.randn(3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ours_grads = _grads(lambda x, a, b: lora_update(x, a, b, 2.0, mask, keep), x, lora_A, lora_B, grad_out)
        ref, ref_grads = _grads(lambda x, a, b: _reference(x, a, b, 2.0, mask, keep), x, lora_A, lora_B, grad_out)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.1)
    for mine, theirs in zip(ours_grads, ref_grads):
        assert mine.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=0.05, atol=0.2)


def test_dropout_mask_rate_is_p_and_the_output_is_unbiased():
    torch.manual_seed(3)
    mask, keep = dropout_mask((64, 128, 96), 0.05, "cpu")
    assert keep == 1 - round(0.05 * 65536) / 65536
    assert abs((1 - mask.float().mean().item()) - 0.05) < 0.002  # 786k draws: std 0.00025
    dropout = AdapterDropout(0.05).train()
    x = torch.randn(256, 512)
    out = dropout(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / keep)  # survivors scaled by 1/keep: E[out] = x
    torch.manual_seed(4)
    first = dropout(x)
    torch.manual_seed(4)
    assert torch.equal(first, dropout(x))  # seeded like every torch draw
    assert torch.equal(dropout.eval()(x), x)


def test_no_mask_is_drawn_when_p_is_zero_or_in_eval_mode():
    layer = LoRAConfig(r=4, dropout=0.0).build(torch.nn.Linear(16, 8)).train()
    state = torch.get_rng_state()
    layer(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(state, torch.get_rng_state())
    layer = LoRAConfig(r=4, dropout=0.1).build(torch.nn.Linear(16, 8)).eval()
    state = torch.get_rng_state()
    layer(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("config", [LoRAConfig(r=4, alpha=8, dropout=0.2), LoRAFAConfig(r=4, alpha=8, dropout=0.2)])
def test_lora_layer_training_step_equals_the_composition_with_the_same_mask(config):
    torch.manual_seed(5)
    base = Linear4bit.from_linear(torch.nn.Linear(32, 24))
    layer = config.build(base).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 6, 32, requires_grad=True)
    torch.manual_seed(6)
    out = layer(x)
    out.square().sum().backward()
    torch.manual_seed(6)
    mask, keep = dropout_mask(x.shape, 0.2, "cpu")
    x_ref = x.detach().clone().requires_grad_()
    lora_A = layer.lora_A.detach().clone().requires_grad_(layer.lora_A.requires_grad)
    lora_B = layer.lora_B.detach().clone().requires_grad_()
    ref = base(x_ref) + _reference(x_ref, lora_A, lora_B, layer.scaling, mask, keep)
    ref.square().sum().backward()
    close = {"rtol": 1e-4, "atol": 1e-4}  # same products, another fp32 summation order (scale applied to the hidden)
    torch.testing.assert_close(out, ref, **close)
    torch.testing.assert_close(x.grad, x_ref.grad, **close)
    torch.testing.assert_close(layer.lora_B.grad, lora_B.grad, **close)
    if layer.lora_A.requires_grad:
        torch.testing.assert_close(layer.lora_A.grad, lora_A.grad, **close)
    else:
        assert layer.lora_A.grad is None


def test_training_step_draws_no_bernoulli_mask_and_saves_no_dropped_copy():
    # the profile of issue 20: aten::bernoulli_ was 15% of a step; the dropped copies of x were saved per adapter
    torch.manual_seed(7)
    x = torch.randn(4, 10, 64, requires_grad=True)
    layers = [
        LoRAConfig(r=8, dropout=0.05).build(Linear4bit.from_linear(torch.nn.Linear(64, 64))).train() for _ in range(3)
    ]  # q, k, v read the same input
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.profiler.profile() as prof, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(layer(x).sum() for layer in layers)
    loss.backward()
    names = {event.name for event in prof.events()}
    assert not {"aten::bernoulli_", "aten::native_dropout", "aten::dropout"} & names
    # saved: x once (shared by the three), three boolean masks and three (tokens, r) hiddens -- no float copy of x
    x_bytes = x.numel() * 4
    assert sum(saved.values()) <= x_bytes + 3 * x.numel() + 3 * (40 * 8 * 4) + 3 * 2 * (64 * 8 * 4)
