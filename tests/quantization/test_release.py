"""Float weights read from a memory-mapped file give their pages back after quantization."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_qlora.quantization.convert import quantize_linears
from lightning_qlora.quantization.release import file_backed_mappings, release_file_backed_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise")

N = 1 << 20  # 4 MiB of float32


def _rss_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture
def mapped(tmp_path):
    expected = torch.randn(N, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "weights.bin"
    expected.numpy().tofile(path)
    tensor = torch.from_file(str(path), shared=False, size=N, dtype=torch.float32)  # a private file mapping
    return tensor, expected


def test_pages_of_a_mapped_weight_are_released_and_fault_back_unchanged(mapped):
    tensor, expected = mapped
    assert torch.equal(tensor, expected)  # reads every page
    before = _rss_file_bytes()
    released = release_file_backed_pages(tensor, live=[], mappings=file_backed_mappings())
    assert released >= N * 4 - 2 * 4096
    assert _rss_file_bytes() <= before - released + 64 * 1024  # the pages left the process
    assert torch.equal(tensor, expected)  # untouched pages come back from the file


def test_anonymous_or_shared_memory_is_never_released(mapped):
    tensor, _ = mapped
    owned = torch.randn(N)
    copy = owned.clone()
    assert release_file_backed_pages(owned, live=[], mappings=file_backed_mappings()) == 0
    assert torch.equal(owned, copy)
    view = tensor[N // 2 :]  # something the model still holds overlaps the pages
    assert release_file_backed_pages(tensor, live=[view], mappings=file_backed_mappings()) == 0


def test_quantize_linears_releases_mapped_weights_with_identical_results(mapped):
    tensor, expected = mapped

    def model(weight: torch.Tensor) -> nn.Module:
        net = nn.Sequential(nn.Linear(1024, 1024, bias=False))
        net[0].weight = nn.Parameter(weight.view(1024, 1024), requires_grad=False)
        return net

    quantize_linears(model(torch.randn(N)), "nf4", 64, double_quant=True, skip=())  # loads the kernels first
    from_file, in_memory = model(tensor), model(expected.clone())
    assert torch.equal(tensor, expected)  # the mapped pages are resident now
    del tensor
    before = _rss_file_bytes()
    quantize_linears(from_file, "nf4", 64, double_quant=True, skip=())
    quantize_linears(in_memory, "nf4", 64, double_quant=True, skip=())
    assert _rss_file_bytes() < before - 3 * 2**20
    a, b = from_file[0].weight, in_memory[0].weight
    assert torch.equal(a.packed, b.packed) and torch.equal(a.dequantize(), b.dequantize())
