"""``NF4Precision``: the Lightning precision plugin for QLoRA, on CPU and CUDA, for any LightningModule.

``Trainer(plugins=[NF4Precision(mode="nf4-dq", adapter=LoRAConfig(r=16))])`` quantizes the
LightningModule's Linear layers to 4 bits (layer by layer), puts adapters on them and freezes
everything else before the optimizers are built; inputs and the forward run in the compute
dtype. Unlike Lightning's ``BitsandbytesPrecision`` it runs on CPUs. The work is done by
:func:`lightning_qlora.qlora.apply_qlora`; the plugin only overrides Lightning hooks:

* ``convert_module`` -- convert (validated first: on an error the module is unchanged); when the
  Trainer resumes, check the checkpoint's QLoRA settings and load its converted state
  (:mod:`lightning_qlora.plugins.checkpoint`), so a plain LightningModule resumes with no hook.
* ``module_init_context`` -- a model built inside it (``configure_model``, ``fabric.init_module()``)
  is converted as soon as it is built.
* ``pre_backward`` (Trainer) / ``backward`` (Fabric) -- adds the adapters' summed ``extra_loss()``
  (AdaLoRA's orthogonality, a mixture's load balancing) to the loss that is backpropagated.
* ``optimizer_step`` -- runs the adapters' ``after_optimizer_step()`` (Delta-LoRA's base update).
* ``on_save_checkpoint`` -- records the settings and writes the resumable layout.

``adapter=None`` quantizes and freezes only (your own adapters, or inference).

Your ``configure_optimizers`` should optimize the trainable parameters, e.g.
``torch.optim.AdamW(lightning_qlora.adapters.adapter_param_groups(self, lr))`` (this also
gives LoRA+ its faster B).
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import AdapterConfig, adapter_extra_loss, after_optimizer_step
from lightning_qlora.errors import ConfigError
from lightning_qlora.plugins.checkpoint import (
    CheckpointMismatchError,
    check_spec,
    layers_replaced_by_stash,
    load_stash_state,
    loaded_checkpoint,
    read_stash,
    save_stash,
    spec_record,
)
from lightning_qlora.plugins.compute_dtype import choose_compute_dtype
from lightning_qlora.qlora import QLoRAReport, QLoRASpec, apply_qlora, default_adapter
from lightning_qlora.quantization.linear import Linear4bit
from lightning_qlora.quantization.tensor import Quantized4bitTensor
from lightning_qlora.threads import StepThreads

#: set on a module the plugin converted: ``(spec record, converted at construction?)``
_CONVERTED = "_lightning_qlora_converted"


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
        compute_dtype: ``"auto"`` (bf16 on CUDA; on CPU whichever of fp32 and bf16 a quick measurement finds
            faster, once per process: :mod:`lightning_qlora.plugins.compute_dtype`), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        adapter: adapter config (default ``LoRAConfig(r=16, alpha=32)``); ``None`` quantizes and freezes only.
        target_modules: Linear layers to adapt (default ``"all-linear"``).
        skip_modules: layers left in float and without adapters (default ``("lm_head",)``).
        adaptive_threads: run each optimizer step on torch's thread count or on one thread, whichever
            its measured steps find faster (:class:`lightning_qlora.threads.StepThreads`): beside busy
            processes a 2-thread step can be several times slower than a 1-thread one. Off by default
            (a step on another count can round differently, so an exact resume needs a fixed count).
            The Trainer's steps use it by themselves; with Fabric, run your step in
            ``with precision.step_threads.step():``.
    """

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
        super().__init__()
        if not isinstance(adaptive_threads, bool):
            raise ConfigError(f"adaptive_threads={adaptive_threads!r}: give True or False.")
        self.spec = QLoRASpec(
            mode=mode,
            blocksize=blocksize,
            adapter=adapter,
            target_modules=target_modules,
            skip_modules=tuple(skip_modules),
        )
        self.compute_dtype = choose_compute_dtype(compute_dtype)
        self._auto_dtype = compute_dtype == "auto"  # measured: a resumed run takes the checkpoint's choice
        self._modules: list[weakref.ref[nn.Module]] = []
        #: the per-step thread choice (``adaptive_threads=True``), else None
        self.step_threads = StepThreads() if adaptive_threads else None

    # -- conversion ------------------------------------------------------------------------

    def _convert(self, module: nn.Module, at_construction: bool, checkpoint: dict[str, Any] | None = None) -> None:
        stash = read_stash(checkpoint)
        if stash is not None and stash.get("spec"):
            check_spec(stash["spec"], self.spec)  # before anything is touched
        replaced = layers_replaced_by_stash(stash) if stash is not None else set()
        _broadcast_from_rank_zero(module)
        with torch.no_grad():  # placeholders of a resumed float layout: their values come from the stash
            for name in replaced:
                weight = getattr(_submodule(module, name), "weight", None)
                if isinstance(weight, torch.Tensor) and not isinstance(weight, Quantized4bitTensor):
                    weight.zero_()
        report = apply_qlora(module, self.spec)
        if stash is not None:
            check_spec(stash["spec"], self.spec, report.adapted)
            load_stash_state(module, stash)
        self._give_layers_the_compute_dtype(module)
        _hide_frozen_4bit_weights_from_ddp(module)
        setattr(module, _CONVERTED, (spec_record(self.spec, report), at_construction))
        self._remember(module)

    def _give_layers_the_compute_dtype(self, module: nn.Module) -> None:
        """On CPU the 4-bit layers carry a 16-bit compute dtype, so evaluation and ``generate`` after ``fit`` use it too."""
        dtype = self.compute_dtype if self._matmuls_only() else None
        for layer in module.modules():
            if isinstance(layer, Linear4bit):
                layer.compute_dtype = dtype

    def _remember(self, module: nn.Module) -> None:
        if all(ref() is not module for ref in self._modules):
            self._modules.append(weakref.ref(module))

    def _converted_modules(self) -> Iterator[nn.Module]:
        for ref in self._modules:
            module = ref()
            if module is not None:
                yield module

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        if getattr(module, _CONVERTED, None) is None:
            self._convert(module, at_construction=False, checkpoint=loaded_checkpoint(module))
        else:
            self._remember(module)
            stash = read_stash(loaded_checkpoint(module))
            if stash is not None:  # converted at construction: Lightning restored the converted layout already
                check_spec(stash["spec"], self.spec, getattr(module, _CONVERTED)[0]["adapted"])
                if stash["layout"] == "adapters":
                    load_stash_state(module, stash)
        return module

    @override
    def module_init_context(self) -> AbstractContextManager:
        return _ConvertAtExit(self)

    # -- forward and the per-step work -------------------------------------------------------

    def _matmuls_only(self) -> bool:
        """On CPU a 16-bit compute dtype applies to the 4-bit layers' matmuls only (bitsandbytes' meaning).

        CPU autocast would also run attention, the adapters and a cast of every activation between
        the fp32 residual stream and each matmul in bf16: measured slower than plain fp32 for the
        main job's step, while the 4-bit layers' own bf16 matmuls can be faster (AMX, or
        AVX512-BF16: what ``auto`` measures). CUDA keeps autocast (tensor cores for every matmul,
        attention included).
        """
        return self.compute_dtype != torch.float32 and not torch.cuda.is_available()

    @override
    def forward_context(self) -> AbstractContextManager:
        if self.compute_dtype == torch.float32 or self._matmuls_only():  # CPU: the converted layers carry it
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.compute_dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        if self._matmuls_only():  # the model keeps its dtype; the 4-bit layers cast for their matmuls
            return data
        return apply_to_collection(data, torch.Tensor, _cast_floating, self.compute_dtype)

    def _with_extra_loss(self, tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        extras = [extra for module in self._converted_modules() if (extra := adapter_extra_loss(module)) is not None]
        if not extras:
            return tensor
        return tensor + scale * torch.stack(extras).sum().to(tensor.dtype)

    def _after_step(self) -> None:
        for module in self._converted_modules():
            after_optimizer_step(module)

    def _trainer_step(self, step: Callable[[], Any]) -> Any:
        """A Trainer's optimizer step (its closure runs the forward and backward) on the chosen thread
        count (``adaptive_threads``), then the adapters' after-step work; returns ``step()``'s output."""
        with self.step_threads.step() if self.step_threads is not None else contextlib.nullcontext():
            output = step()
        self._after_step()
        return output

    @override
    def backward(self, tensor: torch.Tensor, model: Any, *args: Any, **kwargs: Any) -> None:
        # Fabric ignores what pre_backward returns, so the extra loss joins here (the Trainer's is pre_backward)
        super().backward(self._with_extra_loss(tensor), model, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, **kwargs)
        self._after_step()
        return output


class _ConvertAtExit(AbstractContextManager):
    """``module_init_context``: the compute dtype as default (CUDA), and every model built inside is converted on exit.

    On CPU a 16-bit compute dtype is the 4-bit matmuls' only, so models are built in torch's default dtype.

    Modules registered as children while the context is open are tracked (torch's global
    module-registration hook, removed on exit); the topmost ones that hold Linear layers --
    the LightningModule for ``configure_model``, the model for ``fabric.init_module()`` -- are
    converted when the context closes, so Lightning restores checkpoints into the converted model.
    """

    def __init__(self, plugin: FabricNF4Precision) -> None:
        self._plugin = plugin
        cast = plugin.compute_dtype != torch.float32 and not plugin._matmuls_only()
        self._dtype = _DefaultDtype(plugin.compute_dtype) if cast else None
        self._parents: dict[int, nn.Module] = {}
        self._children: set[int] = set()
        self._handle: Any = None

    def _registered(self, parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is not None:
            self._parents.setdefault(id(parent), parent)
            self._children.add(id(child))

    def __enter__(self) -> None:
        if self._dtype is not None:
            self._dtype.__enter__()
        self._handle = nn.modules.module.register_module_module_registration_hook(self._registered)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._handle.remove()
        if self._dtype is not None:
            self._dtype.__exit__(exc_type, *exc)
        if exc_type is not None:
            return
        roots = [module for key, module in self._parents.items() if key not in self._children]
        for root in roots:
            if getattr(root, _CONVERTED, None) is None and any(isinstance(m, nn.Linear) for m in root.modules()):
                self._plugin._convert(root, at_construction=True)


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _broadcast_from_rank_zero(module: nn.Module) -> None:
    """Under torch.distributed, give every rank rank 0's float weights before quantizing.

    Quantization is deterministic, so identical float weights give identical 4-bit codes on
    every rank; the 4-bit weights then need no synchronization (see below).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not isinstance(tensor, Quantized4bitTensor):
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

    @override
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        trainer = getattr(module, "_trainer", None)
        automatic = getattr(module, "automatic_optimization", True)
        # Lightning divides each micro-batch's loss by the accumulation count: so is the extra term
        scale = 1.0 / trainer.accumulate_grad_batches if trainer is not None and automatic else 1.0
        return super().pre_backward(self._with_extra_loss(tensor, scale), module)

    @override
    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        return self._trainer_step(functools.partial(Precision.optimizer_step, self, optimizer, model, closure, **kwargs))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The compute dtype in use, so that a resumed ``"auto"`` run computes in the same one."""
        return {"compute_dtype": str(self.compute_dtype).removeprefix("torch.")}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, ``compute_dtype="auto"`` takes the dtype the checkpointed run measured and used.

        ``auto`` is a measurement, and a second process can measure the other way round; an exact
        resume needs the same dtype. An explicit ``compute_dtype`` is the user's choice and stays.
        """
        recorded = getattr(torch, str(state_dict.get("compute_dtype", "")), None)
        if self._auto_dtype and isinstance(recorded, torch.dtype) and recorded != self.compute_dtype:
            self.compute_dtype = recorded
            for module in self._converted_modules():
                self._give_layers_the_compute_dtype(module)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for module in self._converted_modules():
            record, at_construction = getattr(module, _CONVERTED)
            if isinstance(checkpoint.get("state_dict"), dict) and _state_dict_of(module, checkpoint["state_dict"]):
                save_stash(checkpoint, module, record, float_built=not at_construction)
                return


def _state_dict_of(module: nn.Module, state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` is ``module``'s (the LightningModule's keys, not a submodule's)."""
    return any(name in state_dict for name, _ in module.named_parameters())


class CheckpointModeError(CheckpointMismatchError):
    """A checkpoint's base weights were quantized another way than this run quantizes them."""


_STATE_MARK = ".weight.quant_state.bitsandbytes__"


def _layer_mode(quant_type: str, double_quant: bool, blocksize: int) -> str:
    return f"{quant_type}{'-dq' if double_quant else ''} (blocksize {blocksize})"


def check_checkpoint_mode(module: nn.Module, state_dict: dict[str, Any], mode: str) -> None:
    """Raise :class:`CheckpointModeError` if ``state_dict``'s 4-bit weights do not match ``module``'s.

    For checkpoints in the converted layout (written before the plugin recorded its settings).
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
            raise CheckpointModeError(
                f"checkpoint entry {key!r} is not a readable 4-bit quant state ({error})."
            ) from None
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
    """For checkpoints written before the plugin recorded its settings: convert ``pl_module`` first.

    Checkpoints the plugin writes now need nothing (the plugin resumes them by itself); for
    those this does nothing. Older ones hold the converted layout, which a float module cannot
    take; calling this in ``LightningModule.on_load_checkpoint`` converts the module first and
    checks the quantization mode (:class:`CheckpointModeError`).
    """
    if read_stash(checkpoint) is not None:
        return
    trainer = getattr(pl_module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    qlora = getattr(plugin, "qlora", plugin)  # FSDPNF4Precision wraps the plugin
    if isinstance(qlora, FabricNF4Precision):
        qlora.convert_module(pl_module)
        if checkpoint is not None and isinstance(checkpoint.get("state_dict"), dict):
            check_checkpoint_mode(pl_module, checkpoint["state_dict"], qlora.spec.mode)


__all__ = [
    "CheckpointMismatchError",
    "CheckpointModeError",
    "FabricNF4Precision",
    "NF4Precision",
    "QLoRAReport",
    "check_checkpoint_mode",
    "convert_before_checkpoint_restore",
]
