"""``PagedAdamW`` (32-bit state) and ``PagedAdamW8bit`` (blockwise 8-bit state), updated page by page.

AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101) with ``g`` the gradient and
``t`` the step::

    p   <- p * (1 - lr * wd)
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``PagedAdamW`` runs exactly the operations of ``torch.optim.AdamW``'s single-tensor CPU path
in the same order (``lerp_`` for ``m``, ``mul_``/``addcmul_`` for ``v``, one ``addcdiv_``),
so on the same inputs it gives the same bits; ``m`` and ``v`` have the parameter's dtype.

``PagedAdamW8bit`` keeps ``m`` and ``v`` as 8-bit codes with one float32 absmax per block of
256 (Dettmers et al., 8-bit Optimizers via Block-wise Quantization,
https://arxiv.org/abs/2110.02861): ``m`` on bitsandbytes' signed dynamic map, ``v`` on its
unsigned one. Each page is dequantized, updated in float32 as bitsandbytes' ``AdamW8bit``
does, and requantized exactly as ``torch.ops.lightning_qlora.quantize_blockwise_8bit`` (and
bitsandbytes) would (:mod:`lightning_qlora.optim.quantize8bit`, with its table cached). Parameters
with fewer than ``min_8bit_size`` elements keep 32-bit state, as in bitsandbytes. Checkpoints
use bitsandbytes' keys (``state1``, ``state2``, ``absmax1``, ``absmax2``, ``qmap1``, ``qmap2``).

Example:
    >>> model = torch.nn.Linear(64, 64)
    >>> optimizer = PagedAdamW(model.parameters(), lr=1e-3)   # host pages on CPU
    >>> model(torch.randn(8, 64)).sum().backward()
    >>> optimizer.step()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from lightning_qlora.optim.errors import PagedOptimizerError
from lightning_qlora.optim.layout import PageLayout, Slot
from lightning_qlora.optim.paged import PagedOptimizer, check_hyperparameters
from lightning_qlora.optim.quantize8bit import dequantize_state_8bit, quantize_state_8bit
from lightning_qlora.optim.stores import PageStore
from lightning_qlora.quantization.codebooks import dynamic_map_8bit

#: Block size of the 8-bit states (bitsandbytes' blockwise optimizers use 256).
STATE_BLOCKSIZE_8BIT = 256
_BNB_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
_BNB_QUANT_STATE_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


def unsigned_dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' unsigned 8-bit dynamic map (``create_dynamic_map(signed=False)``), for ``v``.

    Exponent level ``e = 0..6`` covers ``10^(e-6) * (0.1, 1]`` with ``2^(e+1)`` linearly spaced
    fraction midpoints (twice the signed map's, the sign bit being free); 0 and 1 complete the
    256 sorted values.
    """
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** (exponent + 1) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (exponent - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _state_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return dynamic_map_8bit().to(device), unsigned_dynamic_map_8bit().to(device)


@dataclass(frozen=True)
class _AdamContext:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    step: float


def _adam_group(name: str, group: dict[str, Any], step: float) -> _AdamContext:
    lr = group["lr"]
    return _AdamContext(
        lr=float(lr.item()) if isinstance(lr, torch.Tensor) else lr,
        beta1=group["betas"][0],
        beta2=group["betas"][1],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        maximize=group.get("maximize", False),
        step=step,
    )


class PagedAdamW(PagedOptimizer):
    """AdamW whose ``exp_avg`` / ``exp_avg_sq`` live in pages (bit-exact with ``torch.optim.AdamW``).

    Args:
        params: parameters or groups (extra group keys, e.g. LoRA+'s, are kept).
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (``amsgrad`` is not supported).
        store: the page store (default host memory on CPU, managed memory on CUDA).
        page_elements: elements per page (see :class:`~lightning_qlora.optim.paged.PagedOptimizer`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        store: PageStore | None = None,
        page_elements: int | None = None,
    ) -> None:
        check_hyperparameters(type(self).__name__, lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults, store=store, page_elements=page_elements)

    @override
    def _layout(self, param: torch.Tensor) -> PageLayout:
        return PageLayout((Slot("exp_avg", param.dtype), Slot("exp_avg_sq", param.dtype)))

    @override
    def _initial_step(self) -> torch.Tensor:
        return torch.tensor(0.0, dtype=torch.float32)  # torch.optim.AdamW's step counter

    @override
    def _begin_param(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any]) -> _AdamContext:
        state["step"] += 1
        return _adam_group(type(self).__name__, group, float(state["step"].item()))

    @override
    def _update_page(
        self, context: _AdamContext, slots: dict[str, torch.Tensor], param: torch.Tensor, grad: torch.Tensor
    ) -> None:
        # the operations and their order are torch.optim.adam._single_tensor_adam's
        c = context
        grad = -grad if c.maximize else grad
        exp_avg, exp_avg_sq = slots["exp_avg"], slots["exp_avg_sq"]
        if c.weight_decay != 0:
            param.mul_(1 - c.lr * c.weight_decay)
        exp_avg.lerp_(grad, 1 - c.beta1)
        exp_avg_sq.mul_(c.beta2).addcmul_(grad, grad, value=1 - c.beta2)
        bias_correction1 = 1 - c.beta1**c.step
        bias_correction2 = 1 - c.beta2**c.step
        step_size = c.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(c.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class PagedAdamW8bit(PagedOptimizer):
    """AdamW with blockwise 8-bit ``m`` / ``v`` in pages (the math of bitsandbytes' ``AdamW8bit``).

    Args:
        params: parameters or groups.
        lr, betas, eps, weight_decay: as bitsandbytes' ``AdamW8bit``.
        min_8bit_size: parameters with fewer elements keep float32 state (bitsandbytes: 4096).
        store: the page store (default host memory on CPU, managed memory on CUDA).
        page_elements: elements per page (see :class:`~lightning_qlora.optim.paged.PagedOptimizer`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
        store: PageStore | None = None,
        page_elements: int | None = None,
    ) -> None:
        check_hyperparameters(type(self).__name__, lr, betas, eps, weight_decay)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise PagedOptimizerError(f"min_8bit_size={min_8bit_size!r} must be an int >= 0.")
        self.min_8bit_size = min_8bit_size
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, store=store, page_elements=page_elements)

    def _is_8bit(self, param: torch.Tensor) -> bool:
        return param.numel() >= self.min_8bit_size

    @override
    def _layout(self, param: torch.Tensor) -> PageLayout:
        if not self._is_8bit(param):
            return PageLayout((Slot("state1", torch.float32), Slot("state2", torch.float32)))
        return PageLayout(
            (
                Slot("state1", torch.uint8),
                Slot("state2", torch.uint8),
                Slot("absmax1", torch.float32, STATE_BLOCKSIZE_8BIT),
                Slot("absmax2", torch.float32, STATE_BLOCKSIZE_8BIT),
            )
        )

    @override
    def _initial_step(self) -> int:
        return 0  # bitsandbytes keeps an int

    @override
    def _begin_param(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any]) -> _AdamContext:
        state["step"] += 1
        return _adam_group(type(self).__name__, group, state["step"])

    @override
    def _export_extra(self, param: torch.Tensor) -> dict[str, Any]:
        if not self._is_8bit(param):
            return {}
        signed, unsigned = _state_maps(torch.device("cpu"))
        return {"qmap1": signed.clone(), "qmap2": unsigned.clone()}

    @override
    def state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()
        for entry in packed["state"].values():
            # bitsandbytes nests these (hiding them from FSDP's gathering); same layout, so its
            # AdamW8bit and this optimizer load each other's checkpoints
            entry[_BNB_QUANT_STATE_KEY] = {key: entry.pop(key) for key in _BNB_QUANT_STATE_KEYS if key in entry}
        return packed

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {}
        for index, entry in dict(state_dict.get("state", {})).items():
            entry = dict(entry)
            entry.update(entry.pop(_BNB_QUANT_STATE_KEY, {}))
            state[index] = entry
        super().load_state_dict({**state_dict, "state": state})

    @override
    def _update_page(
        self, context: _AdamContext, slots: dict[str, torch.Tensor], param: torch.Tensor, grad: torch.Tensor
    ) -> None:
        c = context
        quantized = "absmax1" in slots
        if quantized:
            signed, unsigned = _state_maps(param.device)
            m = dequantize_state_8bit(slots["state1"], slots["absmax1"], signed, STATE_BLOCKSIZE_8BIT)
            v = dequantize_state_8bit(slots["state2"], slots["absmax2"], unsigned, STATE_BLOCKSIZE_8BIT)
        else:
            m, v = slots["state1"], slots["state2"]
        # the operations and their order are those of bitsandbytes' CPU Adam kernels (8-bit
        # blockwise, and 32-bit for small parameters), so results match AdamW8bit's
        g = grad.float()
        p = param.float()
        m.mul_(c.beta1).add_(g, alpha=1.0 - c.beta1)
        v.mul_(c.beta2).addcmul_(g, g, value=1.0 - c.beta2)
        correction1 = 1.0 - c.beta1**c.step
        correction2 = math.sqrt(1.0 - c.beta2**c.step)
        if quantized:
            denom = (v.sqrt() / correction2).add_(c.eps)
            if c.weight_decay > 0.0:
                p.mul_(1.0 - c.lr * c.weight_decay)
            p.addcdiv_(m, denom, value=-c.lr / correction1)
        else:
            if c.weight_decay > 0.0:
                p.mul_(1.0 - c.lr * c.weight_decay)
            p.add_(m / (v.sqrt() + c.eps * correction2), alpha=-c.lr * correction2 / correction1)
        if p.data_ptr() != param.data_ptr():
            param.copy_(p)
        if quantized:
            codes, absmax = quantize_state_8bit(m, signed, STATE_BLOCKSIZE_8BIT)
            slots["state1"].copy_(codes)
            slots["absmax1"].copy_(absmax)
            codes, absmax = quantize_state_8bit(v, unsigned, STATE_BLOCKSIZE_8BIT)
            slots["state2"].copy_(codes)
            slots["absmax2"].copy_(absmax)
