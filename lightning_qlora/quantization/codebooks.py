"""Codebooks: the value tables a quantized code indexes into.

A blockwise quantizer stores, per element, the index of the nearest codebook value to
``x / absmax(block)``; dequantization is ``codebook[index] * absmax(block)``. All
codebooks here live in [-1, 1].

* NF4 -- 4-bit NormalFloat (QLoRA, https://arxiv.org/abs/2305.14314), the exact 16 values
  bitsandbytes uses, so packed codes are interchangeable.
* FP4 -- bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit, bias 2), listed in
  bit-pattern order (index = 4-bit code), normalized by its largest magnitude (12).
* NFk -- NormalFloat for any k in 2..8, derived from normal quantiles (see
  :func:`normal_float_codebook`); k=4 reproduces NF4 exactly.
* INT4 / INT8 -- symmetric linear grids, the classic baseline.
* the signed 8-bit dynamic map (Dettmers, https://arxiv.org/abs/1511.04561) used by
  double quantization of the absmax constants.
"""

from __future__ import annotations

import functools

import torch

from lightning_qlora.errors import UnknownQuantTypeError

# Exact values from bitsandbytes (index = 4-bit code, ascending: 7 negative, zero, 8 positive).
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 magnitudes by the 3 non-sign bits: 000=0, 001=0.0625 (subnormal), 010=8, 011=12,
# 100=4, 101=6, 110=2, 111=3; bit 3 is the sign. Normalized by 12 below.
_FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

#: Names accepted by :func:`get_codebook`.
CODEBOOK_NAMES: tuple[str, ...] = ("nf4", "fp4", "int4", "int8", "dynamic8")

#: Quantile offset bitsandbytes used to build NF4 (the formula below rounded to 7 digits).
NF4_OFFSET = 0.9677083


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, float32, index = code."""
    return torch.tensor(_NF4_VALUES, dtype=torch.float32)


def fp4_codebook() -> torch.Tensor:
    """The 16 FP4 values in bitsandbytes' bit-pattern order, float32, index = code."""
    magnitudes = torch.tensor(_FP4_UNSCALED, dtype=torch.float32)
    values = torch.cat([magnitudes, -magnitudes])
    return values / values.abs().max()


def default_normal_float_offset(bits: int) -> float:
    """Outermost quantile for an NF``bits`` codebook.

    QLoRA places the extreme code halfway between the outermost quantiles of a
    2^k-1 and a 2^k grid: ``offset = 1 - (1/(2(2^k-1)) + 1/(2*2^k)) / 2``. For k=4 this is
    0.96770833..., which bitsandbytes rounded to 0.9677083; we return that rounded value
    for k=4 so NF4 is reproduced bit for bit.
    """
    if bits == 4:
        return NF4_OFFSET
    levels = 2**bits
    return 1.0 - (1.0 / (2 * (levels - 1)) + 1.0 / (2 * levels)) / 2


def normal_float_codebook(bits: int, offset: float | None = None) -> torch.Tensor:
    """Derive an NFk codebook (k = ``bits``) from quantiles of the standard normal.

    With ``Phi^-1`` the normal quantile function and ``h = 2^(k-1)``::

        positive = Phi^-1(linspace(offset, 0.5, h + 1)[:-1])      # h values
        negative = -Phi^-1(linspace(offset, 0.5, h)[:-1])         # h - 1 values
        codebook = sort(positive + [0] + negative) / max          # 2^k values in [-1, 1]

    The grid is asymmetric (one more positive value) so that zero is exactly representable,
    as in QLoRA. The quantile grid is float32 (as bitsandbytes built it), the quantiles are
    float64, the result float32.

    Args:
        bits: k, from 2 to 8.
        offset: outermost quantile; defaults to :func:`default_normal_float_offset`.

    Returns:
        Tensor of shape ``(2**bits,)``, float32, ascending.

    Example:
        >>> torch.equal(normal_float_codebook(4), nf4_codebook())
        True
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UnknownQuantTypeError(f"NormalFloat bits={bits!r} is not supported; choose an integer from 2 to 8.")
    if offset is None:
        offset = default_normal_float_offset(bits)
    if not 0.5 < offset < 1.0:
        raise UnknownQuantTypeError(f"offset={offset!r} must lie strictly between 0.5 and 1.")
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def symmetric_int_codebook(bits: int) -> torch.Tensor:
    """Symmetric linear grid ``{-(2^(b-1)-1) .. 2^(b-1)-1} / (2^(b-1)-1)``, padded to 2^b entries.

    The most negative code (-2^(b-1)) is unused by symmetric absmax quantization; it is
    stored as a duplicate of -1 so the table has 2^b entries and stays sorted.
    """
    if bits not in (4, 8):
        raise UnknownQuantTypeError(f"symmetric integer bits={bits!r} is not supported; choose 4 or 8.")
    top = 2 ** (bits - 1) - 1
    grid = torch.arange(-top, top + 1, dtype=torch.float32) / top
    return torch.cat([grid[:1], grid])


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 sorted values in [-1, 1]).

    Each exponent level ``e = 0..6`` covers ``10^(e-6) * (0.1, 1]`` with ``2^e`` linearly
    spaced fraction midpoints, on both signs; 0 and 1 complete the table. This is the map
    bitsandbytes uses for the nested (double) quantization of absmax constants.
    """
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _cached_codebook(name: str) -> torch.Tensor:
    builders = {
        "nf4": nf4_codebook,
        "fp4": fp4_codebook,
        "int4": lambda: symmetric_int_codebook(4),
        "int8": lambda: symmetric_int_codebook(8),
        "dynamic8": dynamic_map_8bit,
    }
    return builders[name]()


def get_codebook(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the named codebook (a fresh copy, safe to mutate) on ``device``.

    Args:
        name: one of :data:`CODEBOOK_NAMES`, or ``"nf2"`` .. ``"nf8"``.
        device: where the table should live (default CPU).
    """
    if isinstance(name, str) and name.startswith("nf") and name[2:].isdigit() and name != "nf4":
        return normal_float_codebook(int(name[2:])).to(device)
    if name not in CODEBOOK_NAMES:
        raise UnknownQuantTypeError(
            f"unknown codebook {name!r}; choose one of {', '.join(CODEBOOK_NAMES)} or nf2..nf8."
        )
    return _cached_codebook(name).to(device, copy=True)
