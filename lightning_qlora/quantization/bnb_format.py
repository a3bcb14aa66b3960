"""Conversion between :class:`Quantized4bitTensor` and bitsandbytes' formats.

bitsandbytes is the de-facto format for 4-bit weights. A weight ``<key>`` is saved as::

    <key>                                   uint8 (ceil(numel/2), 1)   packed codes
    <key>.absmax                            float32, or uint8 codes when double-quantized
    <key>.quant_map                         float32 (16,)              codebook
    <key>.nested_absmax                     float32                    (double quant only)
    <key>.nested_quant_map                  float32 (256,)             (double quant only)
    <key>.quant_state.bitsandbytes__<type>  uint8 JSON: quant_type, blocksize, dtype, shape
                                            [, nested_blocksize, nested_dtype, nested_offset]

Reading validates every piece and raises :class:`~lightning_qlora.errors.CorruptStateError`
naming what is missing or inconsistent, so a damaged checkpoint never loads as garbage.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lightning_qlora.errors import CorruptStateError, QuantizationError
from lightning_qlora.ops import num_blocks
from lightning_qlora.quantization.functional import NestedAbsmax, validate_quant_type
from lightning_qlora.quantization.tensor import Quantized4bitTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_PREFIX = "quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pack_json(meta: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def to_bnb_state_dict(weight: Quantized4bitTensor, key: str = "weight") -> dict[str, torch.Tensor]:
    """bitsandbytes state-dict entries for ``weight`` under ``key`` (byte-identical to bitsandbytes)."""
    meta: dict[str, Any] = {
        "quant_type": weight.quant_type,
        "blocksize": weight.blocksize,
        "dtype": _dtype_name(weight.dtype),
        "shape": list(weight.shape),
    }
    out = {key: weight.packed.reshape(-1, 1)}
    if weight.nested is None:
        out[f"{key}.absmax"] = weight.absmax
        out[f"{key}.quant_map"] = weight.code
    else:
        nested = weight.nested
        out[f"{key}.absmax"] = nested.codes
        out[f"{key}.quant_map"] = weight.code
        out[f"{key}.nested_absmax"] = nested.nested_absmax
        out[f"{key}.nested_quant_map"] = nested.code.clone()
        meta.update(nested_blocksize=nested.blocksize, nested_dtype="float32", nested_offset=nested.offset.item())
    out[f"{key}.{_STATE_PREFIX}{weight.quant_type}"] = _pack_json(meta)
    return out


def _require(entries: dict[str, Any], name: str, key: str) -> torch.Tensor:
    value = entries.get(f"{key}.{name}")
    if not isinstance(value, torch.Tensor):
        raise CorruptStateError(f"4-bit weight {key!r} is missing '{key}.{name}' in the state dict.")
    return value


def _read_meta(entries: dict[str, Any], key: str) -> dict[str, Any]:
    state_keys = [k for k in entries if k.startswith(f"{key}.{_STATE_PREFIX}")]
    if len(state_keys) != 1:
        raise CorruptStateError(
            f"4-bit weight {key!r} needs exactly one '{key}.{_STATE_PREFIX}<type>' entry, found {state_keys}."
        )
    raw = entries[state_keys[0]]
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).cpu().tolist()).decode("utf-8"))
        quant_type = meta["quant_type"]
        validate_quant_type(quant_type)
        meta["blocksize"] = int(meta["blocksize"])
        meta["dtype"] = _DTYPES[meta["dtype"]]
        meta["shape"] = tuple(int(d) for d in meta["shape"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, QuantizationError) as error:
        raise CorruptStateError(f"quant state of 4-bit weight {key!r} cannot be read: {error!r}") from error
    if state_keys[0] != f"{key}.{_STATE_PREFIX}{quant_type}":
        raise CorruptStateError(f"quant state key {state_keys[0]!r} disagrees with its quant_type {quant_type!r}.")
    return meta


def from_bnb_state_dict(entries: dict[str, Any], key: str = "weight") -> Quantized4bitTensor:
    """Rebuild a :class:`Quantized4bitTensor` from bitsandbytes state-dict entries under ``key``."""
    meta = _read_meta(entries, key)
    if key not in entries:
        raise CorruptStateError(f"4-bit weight {key!r} has no packed data ('{key}' is missing).")
    packed = entries[key].reshape(-1)
    absmax = _require(entries, "absmax", key)
    code = _require(entries, "quant_map", key).float()
    nested = None
    if "nested_blocksize" in meta:
        blocks = num_blocks(int(torch.Size(meta["shape"]).numel()), meta["blocksize"])
        nested_absmax = _require(entries, "nested_absmax", key)
        try:
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
            nested_blocksize = int(meta["nested_blocksize"])
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptStateError(f"nested quant state of {key!r} is incomplete: {error!r}") from error
        if absmax.dtype != torch.uint8 or absmax.numel() != blocks:
            raise CorruptStateError(
                f"'{key}.absmax' should hold {blocks} uint8 codes (double-quantized), got {absmax.dtype} x {absmax.numel()}."
            )
        if nested_absmax.numel() != num_blocks(blocks, nested_blocksize):
            raise CorruptStateError(
                f"'{key}.nested_absmax' should hold {num_blocks(blocks, nested_blocksize)} values, got {nested_absmax.numel()}."
            )
        nested_code = _require(entries, "nested_quant_map", key).float()
        nested = NestedAbsmax(absmax, nested_absmax.float(), nested_code, offset, nested_blocksize)
        absmax = None
    try:
        return Quantized4bitTensor(
            packed, absmax, nested, code, meta["quant_type"], meta["blocksize"], meta["shape"], meta["dtype"]
        )
    except QuantizationError as error:
        raise CorruptStateError(f"4-bit weight {key!r} is inconsistent: {error}") from error


def to_quant_state(weight: Quantized4bitTensor) -> Any:
    """A ``bitsandbytes.functional.QuantState`` describing ``weight`` (packed data: ``weight.packed``)."""
    from bitsandbytes.functional import QuantState

    if weight.nested is None:
        return QuantState(
            absmax=weight.absmax,
            shape=weight.shape,
            code=weight.code,
            blocksize=weight.blocksize,
            quant_type=weight.quant_type,
            dtype=weight.dtype,
        )
    nested = weight.nested
    state2 = QuantState(absmax=nested.nested_absmax, code=nested.code, blocksize=nested.blocksize, dtype=torch.float32)
    return QuantState(
        absmax=nested.codes,
        shape=weight.shape,
        code=weight.code,
        blocksize=weight.blocksize,
        quant_type=weight.quant_type,
        dtype=weight.dtype,
        offset=nested.offset,
        state2=state2,
    )


def from_quant_state(packed: torch.Tensor, state: Any) -> Quantized4bitTensor:
    """A :class:`Quantized4bitTensor` from bitsandbytes' packed data and ``QuantState``."""
    nested = None
    absmax = state.absmax
    if state.nested:
        offset = torch.as_tensor(state.offset, dtype=torch.float32)
        nested = NestedAbsmax(state.absmax, state.state2.absmax, state.state2.code, offset, state.state2.blocksize)
        absmax = None
    return Quantized4bitTensor(
        packed.reshape(-1).view(torch.uint8),
        absmax,
        nested,
        state.code,
        state.quant_type,
        state.blocksize,
        tuple(state.shape),
        state.dtype,
    )
