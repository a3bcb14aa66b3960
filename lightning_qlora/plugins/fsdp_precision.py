"""``FSDPNF4Precision``: the QLoRA precision plugin in the form Lightning's FSDP strategy accepts.

Lightning's ``FSDPStrategy`` only takes an ``FSDPPrecision``; this subclass gives it one that
does exactly what :class:`~lightning_qlora.plugins.NF4Precision` does (quantize layer by layer,
inject adapters, freeze the base, compute-dtype context), and tells FSDP the matching mixed
precision for the *float* parameters it shards. Pair it with
:class:`~lightning_qlora.strategies.QLoRAFSDPStrategy`, which keeps the frozen 4-bit weights out
of FSDP's flat parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import AdapterConfig
from lightning_qlora.plugins.nf4_precision import FabricNF4Precision
from lightning_qlora.qlora import default_adapter

_FSDP_PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}


class FSDPNF4Precision(FSDPPrecision):
    """QLoRA precision for FSDP (arguments as :class:`~lightning_qlora.plugins.FabricNF4Precision`)."""

    def __init__(
        self,
        mode: str = "nf4-dq",
        blocksize: int = 64,
        compute_dtype: str | torch.dtype = "auto",
        adapter: AdapterConfig | None = default_adapter(),  # noqa: B008  (a frozen, immutable dataclass)
        target_modules: str | Sequence[str] = "all-linear",
        skip_modules: Sequence[str] = ("lm_head",),
        adaptive_threads: bool = False,
    ) -> None:
        self.qlora = FabricNF4Precision(
            mode=mode,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            adapter=adapter,
            target_modules=target_modules,
            skip_modules=skip_modules,
            adaptive_threads=adaptive_threads,
        )
        super().__init__(precision=_FSDP_PRECISION[self.qlora.compute_dtype])  # type: ignore[arg-type]

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        # not FSDPPrecision's module.to(dtype): the 4-bit weights keep their storage
        return self.qlora.convert_module(module)

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.qlora.module_init_context()

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return self.qlora.module_init_context()

    @override
    def forward_context(self) -> AbstractContextManager:
        return self.qlora.forward_context()  # autocast on the device actually used (FSDPPrecision assumes CUDA)

    @override
    def convert_input(self, data: Any) -> Any:
        return self.qlora.convert_input(data)

    @override
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        trainer = getattr(module, "_trainer", None)
        automatic = getattr(module, "automatic_optimization", True)
        scale = 1.0 / trainer.accumulate_grad_batches if trainer is not None and automatic else 1.0
        return super().pre_backward(self.qlora._with_extra_loss(tensor, scale), module)

    @override
    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        return self.qlora._trainer_step(functools.partial(super().optimizer_step, optimizer, model, closure, **kwargs))
