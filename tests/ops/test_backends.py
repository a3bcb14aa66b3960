"""The per-device registration tables and the one fallback path (ops/_backends.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.ops import OP_NAMES, _backends, qualified_name, reference
from lightning_qlora.ops._cuda_extension import CUDA_KERNELS
from lightning_qlora.ops._extension import CPU_KERNELS


def test_every_device_table_names_only_our_ops_and_cpu_has_them_all():
    ours = set(OP_NAMES) | set(reference.SERVING_KERNELS)
    assert set(CPU_KERNELS) == ours
    assert set(CUDA_KERNELS) <= ours
    # the dispatcher has each table's kernels under the device's key
    for table, key in ((CPU_KERNELS, "CPU"), (CUDA_KERNELS, "CUDA")):
        assert all(torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name(name), key) for name in table)


def test_a_table_naming_an_unknown_op_fails_at_registration():
    with pytest.raises(RuntimeError, match="quantise_4bit"):
        _backends.register_backend("cpu", lambda: None, {"quantise_4bit": lambda extension, *args: None})


def _sample():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    code = torch.linspace(-1, 1, 16)
    return weight, code


def test_no_extension_runs_the_reference_kernel_with_the_same_arguments():
    calls = []
    kernel = _backends._with_fallback("quantize_4bit", lambda extension, *args: calls.append(args), lambda: None)
    weight, code = _sample()
    packed, absmax = kernel(weight, code, 64, None)
    expected_packed, expected_absmax = reference.quantize_4bit(weight, code, 64, None)
    assert calls == []
    assert torch.equal(packed, expected_packed) and torch.equal(absmax, expected_absmax)


def test_a_loaded_extension_is_handed_to_the_compiled_kernel_first(monkeypatch):
    monkeypatch.delenv("LIGHTNING_QLORA_FORCE_REFERENCE", raising=False)
    extension = object()
    seen = []

    def compiled(loaded, A, code, blocksize, seed=None):
        seen.append((loaded, blocksize, seed))
        return "compiled"

    kernel = _backends._with_fallback("quantize_4bit", compiled, lambda: extension)
    weight, code = _sample()
    assert kernel(weight, code, 64, seed=3) == "compiled"
    assert seen == [(extension, 64, 3)]


def test_force_reference_skips_a_loaded_extension(monkeypatch):
    monkeypatch.setenv("LIGHTNING_QLORA_FORCE_REFERENCE", "1")
    kernel = _backends._with_fallback("quantize_4bit", lambda *args: pytest.fail("compiled kernel ran"), object)
    weight, code = _sample()
    packed, _ = kernel(weight, code, 64, None)
    assert torch.equal(packed, reference.quantize_4bit(weight, code, 64, None)[0])
