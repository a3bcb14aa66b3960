"""``NF4Precision``: the Lightning precision plugin for QLoRA, on CPU and CUDA.

``Trainer(plugins=[NF4Precision(mode="nf4-dq", adapter=LoRAConfig(r=16))])`` quantizes the
LightningModule's Linear layers to 4 bits (layer by layer), puts adapters on them and freezes
everything else before the optimizers are built; inputs and the forward run in the compute
dtype. Unlike Lightning's ``BitsandbytesPrecision`` it runs on CPUs. The work is done by
:func:`lightning_qlora.qlora.apply_qlora`; the plugin only overrides Lightning hooks.

To resume from a checkpoint, call :func:`convert_before_checkpoint_restore` in the module's
``on_load_checkpoint`` (Lightning restores weights before it converts the model).

Your ``configure_optimizers`` should optimize the trainable parameters, e.g.
``torch.optim.AdamW(lightning_qlora.adapters.adapter_param_groups(self, lr))`` (this also
gives LoRA+ its faster B).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import adapter_layers
from lightning_qlora.qlora import QLoRAConfigError, QLoRASpec, apply_qlora, resolve_compute_dtype
from lightning_qlora.quantization.tensor import Quantized4bitTensor


class _DefaultDtype(AbstractContextManager):
    """Temporarily sets torch's default float dtype (models built inside get that dtype)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self._dtype, self._previous = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        self._previous = torch.get_default_dtype()
        torch.set_default_dtype(self._dtype)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._previous)


class FabricNF4Precision(FabricPrecision):
    """QLoRA precision for ``lightning.Fabric`` (the Trainer uses :class:`NF4Precision`).

    Args:
        mode: ``"nf4"``, ``"nf4-dq"`` (default), ``"fp4"``, ``"fp4-dq"`` or ``"none"``.
        blocksize: quantization block size (32..4096, default 64).
        compute_dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPUs without fast bf16), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        adapter: adapter config (default ``LoRAConfig(r=16, alpha=32)``).
        target_modules: Linear layers to adapt (default ``"all-linear"``).
        skip_modules: layers left in float and without adapters (default ``("lm_head",)``).
    """

    def __init__(
        self,
        mode: str = "nf4-dq",
        blocksize: int = 64,
        compute_dtype: str | torch.dtype = "auto",
        adapter: Any = None,
        target_modules: str | Sequence[str] = "all-linear",
        skip_modules: Sequence[str] = ("lm_head",),
    ) -> None:
        super().__init__()
        extra = {"adapter": adapter} if adapter is not None else {}
        self.spec = QLoRASpec(mode=mode, blocksize=blocksize, target_modules=target_modules,
                              skip_modules=tuple(skip_modules), **extra)  # fmt: skip
        self.compute_dtype = resolve_compute_dtype(compute_dtype)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        if not adapter_layers(module):  # converted already (see convert_before_checkpoint_restore)
            _broadcast_from_rank_zero(module)
            apply_qlora(module, self.spec)
            _hide_frozen_4bit_weights_from_ddp(module)
        return module

    @override
    def module_init_context(self) -> AbstractContextManager:
        return _DefaultDtype(self.compute_dtype) if self.compute_dtype != torch.float32 else contextlib.nullcontext()

    @override
    def forward_context(self) -> AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type, dtype=self.compute_dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, torch.Tensor, _cast_floating, self.compute_dtype)


def _broadcast_from_rank_zero(module: nn.Module) -> None:
    """Under torch.distributed, give every rank rank 0's float weights before quantizing.

    Quantization is deterministic, so identical float weights give identical 4-bit codes on
    every rank; the 4-bit weights then need no synchronization (see below).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def _hide_frozen_4bit_weights_from_ddp(module: nn.Module) -> None:
    """DDP broadcasts every parameter at wrap time; frozen 4-bit weights are equal already and
    cannot be flattened into its buckets, so they go on DDP's documented ignore list."""
    ignored = [name for name, p in module.named_parameters() if isinstance(p, Quantized4bitTensor)]
    existing = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = existing + [n for n in ignored if n not in existing]


def _cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class NF4Precision(Precision, FabricNF4Precision):
    """QLoRA precision for ``lightning.Trainer`` (see :class:`FabricNF4Precision` for the arguments)."""


class CheckpointModeError(QLoRAConfigError):
    """A checkpoint's base weights were quantized another way than this run quantizes them."""


_STATE_MARK = ".weight.quant_state.bitsandbytes__"


def _layer_mode(quant_type: str, double_quant: bool, blocksize: int) -> str:
    return f"{quant_type}{'-dq' if double_quant else ''} (blocksize {blocksize})"


def check_checkpoint_mode(module: nn.Module, state_dict: dict[str, Any], mode: str) -> None:
    """Raise :class:`CheckpointModeError` if ``state_dict``'s 4-bit weights do not match ``module``'s.

    ``module`` is already converted; adapters-only checkpoints (no base weights) always pass.
    The message names the first mismatching layer, both modes, and the ``mode=`` to load with.
    """
    current = {name: p for name, p in module.named_parameters() if isinstance(p, Quantized4bitTensor)}
    for key, value in state_dict.items():
        if _STATE_MARK not in key:
            continue
        name = key.split(".quant_state.", 1)[0]
        try:
            meta = json.loads(bytes(value.tolist()).decode())
            saved = _layer_mode(meta["quant_type"], "nested_blocksize" in meta, int(meta["blocksize"]))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointModeError(f"checkpoint entry {key!r} is not a readable 4-bit quant state ({error}).") from None
        weight = current.get(name)
        if weight is None:
            raise CheckpointModeError(
                f"the checkpoint holds a 4-bit {saved} weight for {name!r}, but this run uses mode={mode!r} and that "
                f"layer is not 4-bit; load it with NF4Precision(mode={saved.split(' ')[0]!r})."
            )
        here = _layer_mode(weight.quant_type, weight.double_quantized, weight.blocksize)
        if here != saved:
            raise CheckpointModeError(
                f"the checkpoint's {name!r} is {saved}, this run quantizes it as {here}; load it with "
                f"NF4Precision(mode={saved.split(' ')[0]!r}, blocksize={meta['blocksize']})."
            )
    if current and not any(_STATE_MARK in key for key in state_dict):
        float_base = [name for name in current if name in state_dict]
        if float_base:
            raise CheckpointModeError(
                f"the checkpoint holds float weights for {float_base[0]!r} (a mode='none' run), but this run is "
                f"mode={mode!r}; load it with NF4Precision(mode='none')."
            )


def convert_before_checkpoint_restore(pl_module: Any, checkpoint: dict[str, Any] | None = None) -> None:
    """Convert ``pl_module`` now if its Trainer uses :class:`NF4Precision` (idempotent), and check ``checkpoint``.

    Lightning restores a checkpoint's model weights *before* the strategy calls
    ``convert_module``, so a checkpoint holding 4-bit weights and adapters would meet a float
    model. Call this first thing in ``LightningModule.on_load_checkpoint``::

        def on_load_checkpoint(self, checkpoint):
            convert_before_checkpoint_restore(self, checkpoint)

    With ``checkpoint`` given, a checkpoint quantized in another mode raises
    :class:`CheckpointModeError` before any weight is loaded.
    """
    trainer = getattr(pl_module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    qlora = getattr(plugin, "qlora", plugin)  # FSDPNF4Precision wraps the plugin
    if isinstance(qlora, FabricNF4Precision):
        qlora.convert_module(pl_module)
        if checkpoint is not None and isinstance(checkpoint.get("state_dict"), dict):
            check_checkpoint_mode(pl_module, checkpoint["state_dict"], qlora.spec.mode)
