"""Evaluate, then fine-tune: the 4-bit layer keeps a real backward in every mode (issue 20).

bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a ``Linear4bit``'s weight for an inference
kernel the first time the layer runs in eval mode without gradients, and that kernel has no
backward: a later training forward gives outputs with no graph to the input, so gradients through
every frozen base layer are dropped (with only a warning). Ours computes the same thing in every
mode; these tests pin the input gradient after each mode sequence to a fresh layer's and to
bitsandbytes' fresh layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.quantization import Linear4bit

bnb = pytest.importorskip("bitsandbytes")


def _layers() -> tuple[torch.nn.Linear, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    return linear, Linear4bit.from_linear(linear, "nf4", 64, double_quant=True).state_dict()


def _ours(state: dict[str, torch.Tensor]) -> Linear4bit:
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 96), "nf4", 64, double_quant=True)
    layer.load_state_dict(state)
    return layer


def _theirs(state: dict[str, torch.Tensor], bias: bool = True) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(128, 96, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in state.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    if bias:
        layer.bias = torch.nn.Parameter(state["bias"].clone(), requires_grad=False)
    return layer


def _input_grad(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor | None:
    x = x.clone().requires_grad_()
    out = layer(x)
    if not out.requires_grad:
        return None
    out.backward(grad_out)
    return x.grad


def _run_modes(layer: torch.nn.Module, modes: list[tuple[bool, bool]], x: torch.Tensor) -> None:
    for training, grad in modes:
        layer.train(training)
        with torch.set_grad_enabled(grad):
            layer(x.clone().requires_grad_(grad))


MODE_SEQUENCES = {
    "eval, no grad": [(False, False)],
    "eval with grad": [(False, True)],
    "train, no grad": [(True, False)],
    "eval, train, eval": [(False, False), (True, True), (False, False)],
}


@pytest.mark.parametrize("sequence", list(MODE_SEQUENCES))
def test_ours_trains_after_any_mode_like_a_fresh_layer_and_like_fresh_bitsandbytes(sequence):
    _, state = _layers()
    x, grad_out = torch.randn(6, 128), torch.randn(6, 96)
    fresh = _input_grad(_ours(state), x, grad_out)
    used = _ours(state)
    _run_modes(used, MODE_SEQUENCES[sequence], x)
    used.train()
    after = _input_grad(used, x, grad_out)
    assert after is not None
    assert torch.equal(after, fresh)
    reference = _input_grad(_theirs(state).train(), x, grad_out)  # a bitsandbytes layer that never ran in eval
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)


def test_lora_on_ours_gets_full_gradients_after_an_evaluation():
    _, state = _layers()
    x, grad_out = torch.randn(2, 5, 128), torch.randn(2, 5, 96)

    def stacked() -> torch.nn.Sequential:  # two layers, so the first adapter's gradient runs through the second base
        torch.manual_seed(1)
        first = LoRAConfig(r=4).build(_ours(state))
        second = LoRAConfig(r=4).build(Linear4bit.from_linear(torch.nn.Linear(96, 128)))
        third = LoRAConfig(r=4).build(_ours(state))
        for layer in (first, second, third):
            torch.nn.init.normal_(layer.lora_B)
        return torch.nn.Sequential(first, second, third)

    fresh, evaluated = stacked(), stacked()
    evaluated.eval()
    with torch.no_grad():
        evaluated(x)
    for model in (fresh, evaluated):
        model.train()
        model(x).backward(grad_out)
    torch.testing.assert_close(evaluated[0].lora_A.grad, fresh[0].lora_A.grad, rtol=0, atol=0)
    assert evaluated[0].lora_A.grad.abs().sum() > 0


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
def test_bitsandbytes_drops_the_input_gradient_after_an_evaluation_here():
    # the peer defect the README warns about; if bitsandbytes fixes it, this fails and the README must change.
    # Without a bias, as in Llama-family models (with one, the training forward raises an in-place autograd error).
    _, state = _layers()
    x, grad_out = torch.randn(6, 128), torch.randn(6, 96)
    theirs = _theirs(state, bias=False)
    assert _input_grad(theirs.train(), x, grad_out) is not None
    _run_modes(theirs, MODE_SEQUENCES["eval, no grad"], x)
    theirs.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _input_grad(theirs, x, grad_out) is None


@pytest.fixture(scope="module")
def main_job(benchmark_module):
    return benchmark_module("main_job")


def _evaluate_then_train_grad(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, restore) -> torch.Tensor:
    _run_modes(layer, MODE_SEQUENCES["eval, no grad"], x)
    restore()
    layer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _input_grad(layer, x, grad_out)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
def test_bitsandbytes_own_inverse_of_the_repacking_changes_the_layer_here():
    # why the benchmark's peer keeps its own copy: bitsandbytes' inverse rounds the absmax through bf16
    # and double-quantizes it again, so training after an evaluation would run on another base.
    _, state = _layers()
    x, grad_out = torch.randn(6, 128), torch.randn(6, 96)
    fresh = _input_grad(_theirs(state, bias=False).train(), x, grad_out)
    theirs = _theirs(state, bias=False)

    def inverse() -> None:
        weight = theirs.weight
        weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )

    after = _evaluate_then_train_grad(theirs, x, grad_out, inverse)
    assert after is not None and not torch.equal(after, fresh)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
def test_the_main_job_peer_trains_on_the_base_it_loaded_after_each_evaluation(main_job):
    _, state = _layers()
    x, grad_out = torch.randn(6, 128), torch.randn(6, 96)
    fresh = _input_grad(_theirs(state, bias=False).train(), x, grad_out)
    model = torch.nn.Sequential(_theirs(state, bias=False))
    loaded = main_job._bnb_training_layout(model)
    for _ in range(2):  # every evaluation repacks again; every restore gives back the layer as loaded
        after = _evaluate_then_train_grad(
            model[0], x, grad_out, lambda: main_job._restore_bnb_training_layout(model, loaded)
        )
        assert after is not None and torch.equal(after, fresh)
    assert main_job._restore_bnb_training_layout(model, loaded) == 0  # nothing repacked: nothing to do
