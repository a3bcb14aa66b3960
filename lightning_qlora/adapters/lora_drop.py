"""LoRA-drop layer state (Zhou et al., https://arxiv.org/abs/2402.07721).

LoRA-drop trains every layer's LoRA briefly, measures each layer's importance as the mean
``||s B A x||^2`` of its output update, keeps its own adapter only on the most important
layers, and lets all other ("dropped") layers of the same shape share one adapter.

This module holds the per-layer state; the ``LoRADrop`` callback drives the two stages.

* :class:`LoRADropLayer` -- a LoRA layer with an importance accumulator (on while
  ``tracking``) and an optional pointer to a :class:`SharedLoRA`;
* :func:`apply_lora_drop` -- keep the named layers, point every other one at the shared
  adapter of its shape, registered once on the model as ``lora_drop_shared``.
* :func:`restore_lora_drop_structure` -- rebuild that sharing from a state dict, so a
  checkpoint or adapter file taken after the selection loads into a freshly injected model
  (each layer's ``uses_shared`` buffer records whether it was dropped). Injection registers
  it as a ``load_state_dict`` pre-hook on the model (the layer's ``on_inject`` hook).

Exports (PEFT, serving) use the adapter each layer really computes with: the shared pair for
a dropped layer, its own for a kept one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfigError
from lightning_qlora.adapters.inject import adapter_layers
from lightning_qlora.adapters.base import LoRAFactors
from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer

SHARED_ATTRIBUTE = "lora_drop_shared"


@dataclass(frozen=True, kw_only=True)
class LoRADropConfig(LoRAConfig):
    """LoRA settings for layers that LoRA-drop may later share."""

    method: ClassVar[str] = "lora_drop"

    def lora_factors_from_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAFactors:
        flag = tensors.get(f"{name}.uses_shared")
        if flag is None or not bool(flag):
            return super().lora_factors_from_state(name, tensors)
        own = tensors[f"{name}.lora_A"]  # a dropped layer computes with its shape's shared pair
        shape = f"{own.shape[1]}x{tensors[f'{name}.lora_B'].shape[0]}"
        return super().lora_factors_from_state(f"{SHARED_ATTRIBUTE}.{shape}", tensors)


class SharedLoRA(nn.Module):
    """One ``(A, B)`` pair used by every dropped layer of one shape; starts from ``A``/``B`` given."""

    #: held on the model for its adapters: merged/float exports skip it
    is_adapter_state = True

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())


class LoRADropLayer(LoRALayer):
    """LoRA layer that measures its importance and can delegate to a shared adapter."""

    def __init__(self, base: nn.Module, config: LoRADropConfig) -> None:
        super().__init__(base, config)
        self.register_buffer("importance_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("importance_tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("uses_shared", torch.zeros((), dtype=torch.bool))
        self.tracking = False
        self._shared: SharedLoRA | None = None  # not a submodule: the model registers it once

    @property
    def shared(self) -> SharedLoRA | None:
        """The shared adapter this layer uses, or ``None`` if it keeps its own."""
        return self._shared

    def importance(self) -> float:
        """Mean ``||s B A x||^2`` over the tokens seen while tracking (0 before any)."""
        tokens = int(self.importance_tokens)
        return float(self.importance_sum) / tokens if tokens else 0.0

    def reset_importance(self) -> None:
        self.importance_sum.zero_()
        self.importance_tokens.zero_()

    def trainable_parameters(self) -> list[nn.Parameter]:
        own = super().trainable_parameters()
        return own if self._shared is None else own + [p for p in self._shared.parameters() if p.requires_grad]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        source = self._shared if self._shared is not None else self
        return source.lora_A, source.lora_B

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.factors()
        x = self.dropout(x)
        out = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))
        out = out * self.scaling
        if self.tracking and self.training:
            with torch.no_grad():
                norms = out.detach().float().reshape(-1, out.shape[-1]).square().sum(-1)
                self.importance_sum += norms.double().sum()
                self.importance_tokens += norms.numel()
        return out

    def delta_weight(self) -> torch.Tensor:
        lora_A, lora_B = self.factors()
        return (lora_B.float() @ lora_A.float()) * self.scaling

    def on_inject(self, model: nn.Module) -> None:
        register_restore_hook(model)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        shared = getattr(model, SHARED_ATTRIBUTE, None)
        if shared is None:
            return {}
        return {f"{SHARED_ATTRIBUTE}.{k}": v.detach() for k, v in shared.state_dict().items()}

    def prepare_load(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        restore_lora_drop_structure(model, tensors)

    def use_shared(self, shared: SharedLoRA) -> None:
        """Delegate to ``shared``; this layer's own A/B stop training."""
        if shared.lora_A.shape != self.lora_A.shape or shared.lora_B.shape != self.lora_B.shape:
            raise AdapterConfigError(
                f"shared adapter shapes {tuple(shared.lora_A.shape)}/{tuple(shared.lora_B.shape)} do not fit this "
                f"layer's {tuple(self.lora_A.shape)}/{tuple(self.lora_B.shape)}."
            )
        self.__dict__["_shared"] = shared  # a plain reference: nn.Module.__setattr__ would make it a submodule
        self.uses_shared.fill_(True)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)


LoRADropConfig.layer_class = LoRADropLayer


class _SharedAdapters(nn.ModuleDict):
    """``model.lora_drop_shared``: the shared adapters by shape; adapter state, not part of the base model."""

    is_adapter_state = True


def _shape_key(layer: LoRADropLayer) -> str:
    return f"{layer.in_features}x{layer.out_features}"


def apply_lora_drop(model: nn.Module, keep: Iterable[str]) -> dict[str, list[str]]:
    """Keep adapters of ``keep``; every other LoRA-drop layer shares one adapter per shape.

    The shared adapters start from the mean of the dropped layers' A and B (their stage-1
    training is not thrown away) and are registered on ``model.lora_drop_shared``.

    Returns:
        ``{"kept": [...], "dropped": [...]}`` layer names.
    """
    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, LoRADropLayer)}
    keep = set(keep)
    unknown = keep - set(layers)
    if unknown:
        raise AdapterConfigError(f"layers to keep {sorted(unknown)} are not LoRA-drop layers of this model.")
    groups: dict[str, list[LoRADropLayer]] = {}
    for name, layer in layers.items():
        if name not in keep:
            groups.setdefault(_shape_key(layer), []).append(layer)
    shared = _SharedAdapters(
        {
            shape: SharedLoRA(
                torch.stack([l.lora_A.detach() for l in group]).mean(0),
                torch.stack([l.lora_B.detach() for l in group]).mean(0),
            )
            for shape, group in groups.items()
        }
    )
    setattr(model, SHARED_ATTRIBUTE, shared)
    for shape, group in groups.items():
        for layer in group:
            layer.use_shared(shared[shape])
    return {"kept": sorted(keep), "dropped": sorted(n for n in layers if n not in keep)}


def restore_lora_drop_structure(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Re-create the sharing recorded in ``state_dict`` (keys relative to ``model`` after ``prefix``).

    Builds ``model.lora_drop_shared`` with the saved shapes (values are loaded afterwards by
    the caller) and points every layer whose saved ``uses_shared`` flag is set at the shared
    adapter of its shape. Does nothing if the state holds no shared adapters or the model
    already has them.

    Returns:
        Whether the structure was rebuilt.
    """
    shared_prefix = f"{prefix}{SHARED_ATTRIBUTE}."
    saved = {k[len(shared_prefix) :]: v for k, v in state_dict.items() if k.startswith(shared_prefix)}
    if not saved or hasattr(model, SHARED_ATTRIBUTE):
        return False
    # the order apply_lora_drop registered them in (the first dropped layer of each shape, in model order),
    # so parameters -- and with them optimizer state -- come in the same order as in the saved run
    dropped = [
        layer
        for name, layer in adapter_layers(model).items()
        if isinstance(layer, LoRADropLayer) and bool(state_dict.get(f"{prefix}{name}.uses_shared", False))
    ]
    saved_shapes = {key.split(".")[0] for key in saved}
    shapes = list(dict.fromkeys(_shape_key(layer) for layer in dropped if _shape_key(layer) in saved_shapes))
    shapes += sorted(saved_shapes - set(shapes))
    try:
        shared = _SharedAdapters(
            {
                shape: SharedLoRA(
                    torch.zeros_like(saved[f"{shape}.lora_A"]), torch.zeros_like(saved[f"{shape}.lora_B"])
                )
                for shape in shapes
            }
        )
    except KeyError as error:
        raise AdapterConfigError(
            f"LoRA-drop state is incomplete: {error.args[0]!r} is missing; the file is damaged."
        ) from None
    setattr(model, SHARED_ATTRIBUTE, shared)
    for name, layer in adapter_layers(model).items():
        flag = state_dict.get(f"{prefix}{name}.uses_shared")
        if isinstance(layer, LoRADropLayer) and flag is not None and bool(flag):
            if _shape_key(layer) not in shared:
                raise AdapterConfigError(
                    f"layer {name!r} shares an adapter of shape {_shape_key(layer)} that the state does not hold."
                )
            layer.use_shared(shared[_shape_key(layer)].to(layer.lora_A.device))
    return True


def _restore_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    restore_lora_drop_structure(module, state_dict, prefix)


def register_restore_hook(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` rebuild LoRA-drop sharing first (idempotent)."""
    if not getattr(model, "_lora_drop_restore_hook", False):
        model.register_load_state_dict_pre_hook(_restore_hook)
        model._lora_drop_restore_hook = True
