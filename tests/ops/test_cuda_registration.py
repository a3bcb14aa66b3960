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


def test_every_cuda_source_is_in_the_one_extension():
    # paged_memory.cu included: the managed-memory page store has no loader of its own any more.
    listed = set(_cuda_extension.SOURCES)
    on_disk = {p.name for p in (_cuda_extension.CSRC / "cuda").glob("*.cu")}
    assert "paged_memory.cu" in on_disk and on_disk <= listed and "bindings.cpp" in listed


def test_the_managed_page_store_has_no_native_loader_of_its_own():
    from pathlib import Path

    from lightning_qlora.optim.stores import cuda_managed

    source = Path(cuda_managed.__file__).read_text()
    assert "import ctypes" not in source and "import subprocess" not in source and "CDLL" not in source
