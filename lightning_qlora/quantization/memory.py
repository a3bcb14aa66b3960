"""Memory accounting for quantized weights: exact bytes and bits per parameter."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_qlora.quantization.tensor import Quantized4bitTensor


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of one weight before and after quantization.

    Attributes:
        numel: elements of the weight.
        float_bytes: bytes in its original dtype.
        packed_bytes: the 4-bit codes (``ceil(numel / 2)``).
        scale_bytes: absmax constants -- float32 each, or with double quantization one byte
            each plus the float32 nested absmax and offset.
        codebook_bytes: the codebook tables stored with the weight (16 and, with DQ, 256 floats).
    """

    numel: int
    float_bytes: int
    packed_bytes: int
    scale_bytes: int
    codebook_bytes: int

    @property
    def quantized_bytes(self) -> int:
        """Everything the quantized weight holds."""
        return self.packed_bytes + self.scale_bytes + self.codebook_bytes

    @property
    def saved_bytes(self) -> int:
        """Bytes saved against the float weight."""
        return self.float_bytes - self.quantized_bytes

    @property
    def bits_per_param(self) -> float:
        """Stored bits per element, everything included."""
        return self.quantized_bytes * 8 / self.numel


def weight_memory(weight: Quantized4bitTensor) -> WeightMemory:
    """Exact storage of ``weight`` (matches :meth:`Quantized4bitTensor.storage_nbytes`)."""
    codebook = weight.code.numel() * 4
    if weight.nested is None:
        scales = weight.absmax.numel() * 4
    else:
        nested = weight.nested
        scales = nested.codes.numel() + nested.nested_absmax.numel() * 4 + 4
        codebook += nested.code.numel() * 4
    return WeightMemory(
        numel=weight.numel(),
        float_bytes=weight.numel() * weight.element_size(),
        packed_bytes=weight.packed.numel(),
        scale_bytes=scales,
        codebook_bytes=codebook,
    )
