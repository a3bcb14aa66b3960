"""The CUDA kernels are registered for every op; on a machine without CUDA nothing is built.

(The CUDA sources and bindings are compile-checked by ``make cuda-check``; no GPU runs them here.)
"""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.ops import _cuda_extension, qualified_name

OPS = ("quantize_4bit", "dequantize_4bit", "linear_4bit", "linear_4bit_input_grad", "bgmv")


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_cuda_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name(name), "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_no_cuda_means_no_build_and_no_warning(recwarn):
    _cuda_extension.cuda_extension.cache_clear()
    assert _cuda_extension.cuda_extension() is None
    assert not [w for w in recwarn if "CUDA" in str(w.message)]


def test_every_cuda_source_is_listed():
    listed = set(_cuda_extension.SOURCES)
    on_disk = {p.name for p in (_cuda_extension.CSRC / "cuda").glob("*.cu")} - {"paged_memory.cu"}  # loaded by ctypes
    assert on_disk <= listed and "bindings.cpp" in listed
