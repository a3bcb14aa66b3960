"""The package's error root, its kinds, and the quantization core's typed errors and validators.

Every error we raise derives from :class:`LightningQLoRAError`, so ``except LightningQLoRAError``
catches all of them, and from one of four kinds by what the user did wrong:

* :class:`ConfigError` -- a setting, argument or config value is invalid (also ``ValueError``);
* :class:`InputError` -- data given to an operation is unusable: shape, dtype, NaN (``ValueError``);
* :class:`FileFormatError` -- a file or directory on disk is missing, damaged or of another kind (``ValueError``);
* :class:`ResourceError` -- the machine cannot do it: memory, disk, a device, a build (``RuntimeError``).

Every error names the offending value and says what is accepted, so a user can fix the
call without reading our source. The quantization core's errors derive from
:class:`QuantizationError` (an :class:`InputError`), and dtype errors are also ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Block sizes accepted for 4-bit blockwise quantization (powers of two, as bitsandbytes).
BLOCK_SIZES_4BIT: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Block sizes accepted for 8-bit blockwise quantization.
BLOCK_SIZES_8BIT: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Floating dtypes we quantize from and dequantize to.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


class LightningQLoRAError(Exception):
    """Root of every error lightning_qlora raises; catch it to handle all of them."""


class ConfigError(LightningQLoRAError, ValueError):
    """A setting, argument or config value is invalid; the message names it and the accepted values."""


class InputError(LightningQLoRAError, ValueError):
    """Data handed to an operation cannot be used (shape, dtype, non-finite values...)."""


class FileFormatError(LightningQLoRAError, ValueError):
    """A file or directory is missing, damaged, or not the kind the operation reads."""


class ResourceError(LightningQLoRAError, RuntimeError):
    """The machine cannot do what was asked (memory, disk, device, compiler, lock)."""


class QuantizationError(InputError):
    """Base class for every input error of the quantization core."""


class UnsupportedDTypeError(QuantizationError, TypeError):
    """A tensor has a dtype the operation cannot take (integer, complex, float64...)."""


class InvalidBlockSizeError(QuantizationError):
    """A block size is not one of the supported powers of two."""


class EmptyTensorError(QuantizationError):
    """A tensor with no elements was given where data is needed."""


class NonFiniteError(QuantizationError):
    """A tensor to quantize holds NaN or +/-Inf.

    Quantizing such a block would poison its absmax and silently turn the whole block
    into NaN (or zero) after dequantization, so we refuse instead.
    """


class ShapeMismatchError(QuantizationError):
    """Quantized data and the metadata describing it do not agree."""


class UnknownQuantTypeError(QuantizationError):
    """A quantization type name is not one we know."""


def check_float_dtype(tensor: torch.Tensor, name: str = "input") -> None:
    """Raise :class:`UnsupportedDTypeError` unless ``tensor`` is fp32, fp16 or bf16."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise UnsupportedDTypeError(
            f"{name} has dtype {tensor.dtype}; quantization accepts only "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}. Cast it first, e.g. `{name}.float()`."
        )


def check_output_dtype(dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedDTypeError` unless ``dtype`` is a dequantization target."""
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedDTypeError(
            f"cannot dequantize to {dtype}; choose one of {', '.join(str(d) for d in FLOAT_DTYPES)}."
        )


def check_block_size(blocksize: int, accepted: Sequence[int] = BLOCK_SIZES_4BIT) -> None:
    """Raise :class:`InvalidBlockSizeError` unless ``blocksize`` is in ``accepted``."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in accepted:
        raise InvalidBlockSizeError(
            f"blocksize={blocksize!r} is not supported; use a power of two from "
            f"{accepted[0]} to {accepted[-1]} ({', '.join(map(str, accepted))}). 64 is the QLoRA default."
        )


def check_not_empty(tensor: torch.Tensor, name: str = "input") -> None:
    """Raise :class:`EmptyTensorError` if ``tensor`` has no elements."""
    if tensor.numel() == 0:
        raise EmptyTensorError(f"{name} is empty (shape {tuple(tensor.shape)}); there is nothing to quantize.")


def check_finite(tensor: torch.Tensor, name: str = "input") -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds NaN or Inf, naming the first one."""
    # One NaN-propagating reduction answers the common case ~10x faster than isfinite().all().
    if bool(torch.isfinite(tensor.detach().abs().amax())):
        return
    bad = (~torch.isfinite(tensor)).reshape(-1)
    count = int(bad.sum())
    first = int(bad.nonzero()[0, 0])
    value = tensor.reshape(-1)[first].item()
    raise NonFiniteError(
        f"{name} holds {count} non-finite value(s) (first: {value} at flat index {first} of shape "
        f"{tuple(tensor.shape)}). NaN/Inf cannot be quantized: they would corrupt the whole block. "
        "Fix the weights (e.g. torch.nan_to_num) or pass check_values=False to quantize anyway."
    )


class CorruptStateError(QuantizationError):
    """A saved quantized weight (state dict, checkpoint, file) is incomplete or inconsistent."""
