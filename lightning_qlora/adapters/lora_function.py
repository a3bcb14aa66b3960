"""The LoRA update as one autograd op, and a cheap dropout mask for adapter inputs.

``lora_update(x, A, B, s, mask, keep)`` computes ``s * (x * mask / keep) A^T B^T`` for
``x (..., in)``, ``A (r, in)``, ``B (out, r)`` with a hand-written backward:

* the scale is applied to the rank-``r`` hidden ``h`` (``r`` values per token), not to the
  ``out``-wide result, in the forward and the backward;
* what is kept for the backward is the undropped input ``x`` (the very tensor the base layer and
  the sibling adapters (q/k/v, gate/up) read, so it costs nothing extra), the boolean mask and the
  small ``h``; PyTorch's composition keeps a separate dropped copy of ``x`` per adapter;
* ``grad_x = (s/keep * g B) A * mask``, ``grad_A = (s/keep * g B)^T (x * mask)``, ``grad_B = g^T (s h)``;
* with ``base_out=`` (what :class:`~lightning_qlora.adapters.lora.LoRALayer` passes: its base layer's
  output) it returns ``base_out + update`` from one ``torch.addmm``, with no update tensor of its own.

:class:`AdapterDropout` replaces ``nn.Dropout`` on adapter inputs. A training step of the main job
spent 15% of its time in ``aten::bernoulli_`` (one float draw per element and adapter); this mask
takes 16 random bits per element from ``torch.randint`` over int64 (a quarter of the draws) and
compares them with a threshold. The drop probability is therefore ``p`` rounded to a multiple of
``2**-16`` (0.05 -> 0.0500031), and survivors are scaled by ``1 / keep`` of that exact
probability, so ``E[dropout(x)] = x`` holds exactly, as for ``nn.Dropout``. Draws come from
torch's default generator, so ``torch.manual_seed`` reproduces them.

Example:
    >>> x, A, B = torch.randn(4, 8), torch.randn(2, 8), torch.randn(3, 2)
    >>> torch.allclose(lora_update(x, A, B, 0.5), 0.5 * x @ A.T @ B.T)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_LANES = 4  # int16 lanes per int64 draw
_RANGE = 1 << 16


def _drop_threshold(p: float) -> int:
    """Lanes below ``-2**15 + threshold`` are dropped: ``threshold = round(p * 2**16)``, at least 1 for ``p > 0``."""
    return max(1, round(p * _RANGE))


def dropout_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str
) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask of ``shape`` (each element kept with probability ``keep``) and ``keep``.

    ``keep = 1 - round(p * 2**16) / 2**16``; see the module docstring.
    """
    numel = math.prod(shape)
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, (max(1, -(-numel // _LANES)),), dtype=torch.int64, device=device)
    threshold = _drop_threshold(p)
    mask = bits.view(torch.int16)[:numel].view(shape) >= threshold - (1 << 15)
    return mask, 1.0 - threshold / _RANGE


def _apply_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` (boolean, same number of elements) is set, 0 elsewhere.

    ``torch.where`` reads the boolean mask as it is; ``values * mask`` first converts the mask to
    ``values``' dtype (a full-size copy per call, three per adapter and step): 54 us against 86 us
    for a main-job ``(232, 576)`` fp32 input on the 2-core VM.
    """
    return torch.where(mask.reshape(values.shape), values, 0.0)


class AdapterDropout(nn.Module):
    """``nn.Dropout`` for adapter inputs with the cheap mask of :func:`dropout_mask`.

    Args:
        p: drop probability in ``[0, 1)`` (rounded to a multiple of ``2**-16``).

    Shapes: any ``x``; returns ``x * mask / keep`` in training, ``x`` otherwise.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """``(mask, keep)`` for ``x``, or ``(None, 1.0)`` when nothing is dropped (eval mode, ``p == 0``)."""
        if not self.training or self.p == 0:
            return None, 1.0
        return dropout_mask(x.shape, self.p, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, keep = self.mask(x)
        return x if mask is None else _apply_mask(x, mask).mul_(1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def adapter_dropout(p: float) -> AdapterDropout:
    """The dropout module an adapter puts on its input (with ``p == 0`` it draws no mask and returns ``x``)."""
    return AdapterDropout(p)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the update's products run in: autocast's where it is on (as ``F.linear``'s would), else ``x``'s.

    Taken explicitly, so that the backward (which autocast does not cover) uses the same dtypes.
    """
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        mask: torch.Tensor | None,
        keep: float,
        base_out: torch.Tensor | None,
    ) -> torch.Tensor:
        device = x.device.type
        dtype = _compute_dtype(x)
        with torch.autocast(device, enabled=False):
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            dropped = flat if mask is None else _apply_mask(flat, mask)
            # the scale goes on the r-wide hidden; 1/keep folds into it too (h is linear in the input)
            hidden = (dropped @ a.t()).mul_(scaling / keep)
            if base_out is None:
                out = hidden @ b.t()
            else:  # base_out + hidden B^T in one BLAS call: no separate update tensor, no extra pass to add it
                out = torch.addmm(base_out.reshape(-1, b.shape[0]), hidden, b.t())
            out = out.view(*x.shape[:-1], b.shape[0])
        ctx.save_for_backward(x, mask, hidden, a, b)
        ctx.factor = scaling / keep
        ctx.param_dtypes = (lora_A.dtype, lora_B.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mask, hidden, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (grad.t() @ hidden).to(ctx.param_dtypes[1])
        if need_x or need_a:
            grad_hidden = (grad @ b).mul_(ctx.factor)  # (tokens, r)
            if need_a:
                flat = x.reshape(-1, x.shape[-1]).to(a.dtype)
                dropped = flat if mask is None else _apply_mask(flat, mask)
                grad_a = (grad_hidden.t() @ dropped).to(ctx.param_dtypes[0])
            if need_x:
                grad_x = grad_hidden @ a
                if mask is not None:
                    grad_x = _apply_mask(grad_x, mask)
                grad_x = grad_x.view(x.shape).to(x.dtype)
        grad_base = grad_out if ctx.needs_input_grad[6] else None  # d(base_out + update) / d(base_out) = 1
        return grad_x, grad_a, grad_b, None, None, None, grad_base


def lora_update(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    keep: float = 1.0,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scaling * ((x * mask / keep) @ A^T) @ B^T``: ``x (..., in)``, ``A (r, in)``, ``B (out, r)`` -> ``(..., out)``.

    Computed in ``x``'s dtype, or autocast's where it is on (the factors are cast to it, as ``F.linear`` would);
    ``mask`` is a boolean keep-mask of ``x``'s shape or ``None`` (no dropout). With ``base_out`` (the
    base layer's output, ``(..., out)``) it returns ``base_out + update`` instead, added inside the
    second product (``torch.addmm``) where ``base_out`` has the compute dtype, and as ``base_out + update``
    (dtype promotion as usual) otherwise.
    """
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"dropout mask of shape {tuple(mask.shape)} does not match the input's {tuple(x.shape)}.")
    if base_out is not None:
        if base_out.dtype != _compute_dtype(x) or base_out.shape != (*x.shape[:-1], lora_B.shape[0]):
            return base_out + _LoRAUpdate.apply(x, lora_A, lora_B, scaling, mask, keep, None)
    return _LoRAUpdate.apply(x, lora_A, lora_B, scaling, mask, keep, base_out)


__all__ = ["AdapterDropout", "adapter_dropout", "dropout_mask", "lora_update"]
