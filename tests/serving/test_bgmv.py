"""``lightning_qlora::bgmv``: the compiled kernel equals the reference within fp32 round-off,
the reference equals per-row dense LoRA, bad tables raise typed errors, and opcheck passes.

Tolerance: both kernels compute ``t_j = x . A_j`` (``in`` products) then ``sum_j s t_j B_j[o]``
(``r`` products) in float32, in different summation orders. For two orders of ``n`` products the
error is at most ``2 n u sum|terms|`` (``u = 2^-24``); we bound each output by
``2 (in + r) u * s * sum_j |t_j|' |B_j[o]|`` with ``|t_j|' = sum_k |x_k A_jk|`` (rigorous, not tuned).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lightning_qlora.errors import ShapeMismatchError
from lightning_qlora.ops import _extension, op, reference

UNIT_ROUNDOFF = 2.0**-24
ROOT = Path(__file__).resolve().parents[2]


def _problem(seed: int, rows: int = 7, in_features: int = 37, out_features: int = 50, ranks=(3, 1, 8, 0)):
    """A pool holding ``len(ranks)`` adapters at scattered offsets, and their dense factors."""
    g = torch.Generator().manual_seed(seed)
    width = max(ranks)
    rows_needed = sum(ranks) * 2
    pool = torch.randn(rows_needed * 64 + 500, generator=g)
    offsets = torch.randperm(rows_needed, generator=g) * 64 + 7  # rows of <= 64 floats, shuffled
    a_rows = torch.zeros(len(ranks), width, dtype=torch.int64)
    b_rows = torch.zeros(len(ranks), width, dtype=torch.int64)
    used = 0
    for s, r in enumerate(ranks):
        a_rows[s, :r] = offsets[used : used + r]
        b_rows[s, :r] = offsets[used + r : used + 2 * r]
        used += 2 * r
    scales = torch.rand(len(ranks), generator=g) + 0.5
    indices = torch.randint(-1, len(ranks), (rows,), generator=g)
    x = torch.randn(rows, in_features, generator=g)
    args = (x, pool, a_rows, b_rows, torch.tensor(ranks), scales, indices, out_features)
    return args


def _dense(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``s (x A^T) B^T`` with explicitly gathered A, B, and the magnitude for the bound."""
    x, pool, a_rows, b_rows, ranks, scales, indices, out_features = args
    out = torch.zeros(x.shape[0], out_features)
    magnitude = torch.zeros_like(out)
    for b, s in enumerate(indices.tolist()):
        if s < 0 or ranks[s] == 0:
            continue
        r = int(ranks[s])
        A = torch.stack([pool[o : o + x.shape[1]] for o in a_rows[s, :r].tolist()])
        B = torch.stack([pool[o : o + out_features] for o in b_rows[s, :r].tolist()], dim=1)
        out[b] = scales[s] * (x[b] @ A.T) @ B.T
        magnitude[b] = scales[s] * ((x[b].abs() @ A.abs().T) @ B.abs().T)
    return out, magnitude


@pytest.mark.parametrize("seed", range(6))
def test_reference_is_per_row_lora(seed):
    args = _problem(seed, rows=5 + seed, in_features=16 + 9 * seed, out_features=64 - 5 * seed)
    expected, magnitude = _dense(args)
    n = args[0].shape[1] + args[2].shape[1]
    assert ((reference.bgmv(*args) - expected).abs() <= 2 * n * UNIT_ROUNDOFF * magnitude + 1e-30).all()


@pytest.mark.parametrize("seed", range(6))
def test_compiled_kernel_matches_reference_within_roundoff(seed):
    if _extension.backend() != "cpp":
        pytest.skip("C++ extension not built on this machine")
    args = _problem(seed, rows=1 + 9 * seed, in_features=5 + 11 * seed, out_features=1 + 12 * seed)
    _, magnitude = _dense(args)
    n = args[0].shape[1] + args[2].shape[1]
    bound = 2 * n * UNIT_ROUNDOFF * magnitude
    result = op("bgmv")(*args)
    assert ((result - reference.bgmv(*args)).abs() <= 2 * bound + 1e-30).all()  # both within the bound of exact
    assert torch.equal(result[args[6] < 0], torch.zeros_like(result[args[6] < 0]))


def test_opcheck():
    torch.library.opcheck(op("bgmv"), _problem(0))
    torch.library.opcheck(op("bgmv"), _problem(1, rows=1, ranks=(2,)))


def test_fake_kernel_gives_shape_on_meta():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _problem(2)]
    assert op("bgmv")(*args).shape == (7, 50)


@pytest.mark.parametrize("force_reference", [False, True])
def test_bad_tables_raise_typed_errors(monkeypatch, force_reference):
    if force_reference:
        monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    x, pool, a_rows, b_rows, ranks, scales, indices, out = _problem(3)
    with pytest.raises(ShapeMismatchError, match="indices|slot"):
        op("bgmv")(x, pool, a_rows, b_rows, ranks, scales, torch.full_like(indices, 4), out)
    with pytest.raises(ShapeMismatchError, match="pool"):
        stale = a_rows.clone()
        stale[2, 0] = pool.numel() - 3  # a row would run past the end of the pool
        op("bgmv")(x, pool, stale, b_rows, ranks, scales, indices, out)
    with pytest.raises(ShapeMismatchError, match="rank"):
        op("bgmv")(x, pool, a_rows, b_rows, torch.tensor([3, 1, 9, 0]), scales, indices, out)
    with pytest.raises(ShapeMismatchError, match="float32"):
        op("bgmv")(x.double(), pool, a_rows, b_rows, ranks, scales, indices, out)


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/bin/nvcc").exists(), reason="no nvcc")
def test_cuda_kernel_compiles(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-O3",
            f"-I{ROOT / 'csrc' / 'include'}",
            "-gencode",
            "arch=compute_80,code=sm_80",
            "-c",
            str(ROOT / "csrc" / "cuda" / "bgmv.cu"),
            "-o",
            str(tmp_path / "bgmv.o"),
        ],
        check=True,
    )
