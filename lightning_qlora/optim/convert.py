"""Turning a LightningModule's optimizer into a paged one, keeping its groups and schedulers.

:func:`to_paged_optimizer` maps a supported optimizer to its paged counterpart with the *same*
parameter-group dicts (so LoRA+'s faster B, per-group learning rates and any extra keys are
kept, and LR schedulers that edit ``group["lr"]`` keep working), carrying over existing state.
:func:`repoint_lr_schedulers` makes schedulers drive the new optimizer. Both are plain
functions, testable without a Trainer; the ``"paged"`` strategy calls them.

With ``implementation="bitsandbytes"`` (CUDA only) the optimizer becomes bitsandbytes'
``PagedAdamW32bit`` / ``PagedAdamW8bit`` instead; :func:`repage_bitsandbytes_state` restores
their paging after a checkpoint load, which bitsandbytes itself loses (bitsandbytes#1381).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch

from lightning_qlora.optim.adamw import PagedAdamW, PagedAdamW8bit
from lightning_qlora.optim.errors import PagedOptimizerError, UnsupportedOptimizerError
from lightning_qlora.optim.paged import PagedOptimizer
from lightning_qlora.optim.stores import STORE_NAMES, make_page_store

#: What :func:`to_paged_optimizer` accepts (shown in its error message).
SUPPORTED_OPTIMIZERS: tuple[str, ...] = (
    "torch.optim.AdamW",
    "torch.optim.Adam (weight_decay=0 or decoupled_weight_decay=True)",
    "bitsandbytes.optim.AdamW / AdamW32bit / AdamW8bit",
    "bitsandbytes.optim.PagedAdamW / PagedAdamW32bit / PagedAdamW8bit",
    "lightning_qlora.optim.PagedAdamW / PagedAdamW8bit (kept as they are)",
)
IMPLEMENTATIONS: tuple[str, ...] = ("native", "bitsandbytes")
_BNB_ADAMW = {
    "AdamW": None,
    "AdamW32bit": 32,
    "AdamW8bit": 8,
    "PagedAdamW": None,
    "PagedAdamW32bit": 32,
    "PagedAdamW8bit": 8,
}
_BNB_PAGED_THRESHOLD = 100_000  # bitsandbytes pages state of parameters with at least this many elements


@dataclass(frozen=True)
class PagingConfig:
    """How optimizers are paged.

    Attributes:
        store: ``"auto"`` (CUDA managed memory on GPU; the file store on CPU if ``budget_bytes`` or
            ``page_dir`` is given, else host memory), ``"host"``, ``"mmap"`` or ``"cuda"``.
        budget_bytes: most bytes of state pages resident at once (``None``: no limit).
        page_dir: directory of the file store's page files (default the system temp directory).
        page_elements: parameter elements per page (default: derived from the budget).
        optim_bits: ``8`` or ``32`` to force the state precision; ``None`` keeps the original's.
        implementation: ``"native"`` (ours, default) or ``"bitsandbytes"`` (its paged optimizers; CUDA only).
    """

    store: str = "auto"
    budget_bytes: int | None = None
    page_dir: str | os.PathLike[str] | None = None
    page_elements: int | None = None
    optim_bits: int | None = None
    implementation: str = "native"

    def __post_init__(self) -> None:
        if self.store not in STORE_NAMES:
            raise PagedOptimizerError(
                f"store={self.store!r} is not a page store; choose one of {', '.join(STORE_NAMES)}."
            )
        if self.optim_bits not in (None, 8, 32):
            raise PagedOptimizerError(f"optim_bits={self.optim_bits!r} must be 8, 32 or None (keep the optimizer's).")
        if self.implementation not in IMPLEMENTATIONS:
            raise PagedOptimizerError(
                f"implementation={self.implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}."
            )
        if self.budget_bytes is not None and (
            isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0
        ):
            raise PagedOptimizerError(f"budget_bytes={self.budget_bytes!r} must be a positive int (bytes) or None.")


def _unsupported(optimizer: torch.optim.Optimizer, why: str = "") -> UnsupportedOptimizerError:
    name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    reason = f" ({why})" if why else ""
    return UnsupportedOptimizerError(
        f"cannot page {name}{reason}. Supported optimizers: {'; '.join(SUPPORTED_OPTIMIZERS)}. "
        "Return one of them from configure_optimizers, or drop the paged strategy."
    )


def _describe(optimizer: torch.optim.Optimizer) -> int:
    """The state precision (8 or 32) of a supported optimizer; raise for anything else."""
    kind = type(optimizer)
    if kind in (torch.optim.AdamW, torch.optim.Adam):
        for group in optimizer.param_groups:
            if group.get("amsgrad"):
                raise _unsupported(optimizer, "amsgrad=True has no paged version")
            if group.get("capturable") or group.get("differentiable"):
                raise _unsupported(optimizer, "capturable/differentiable are not supported")
            if kind is torch.optim.Adam and group["weight_decay"] and not group.get("decoupled_weight_decay"):
                raise _unsupported(optimizer, "Adam's L2 weight decay; use AdamW")
        return 32
    if kind.__module__.startswith("bitsandbytes") and kind.__name__ in _BNB_ADAMW:
        args = optimizer.args
        if getattr(args, "max_unorm", 0.0) > 0 or getattr(args, "percentile_clipping", 100) < 100:
            raise _unsupported(optimizer, "max_unorm / percentile_clipping are not supported")
        bits = _BNB_ADAMW[kind.__name__] or int(args.optim_bits)
        if bits == 8 and not getattr(args, "block_wise", True):
            raise _unsupported(optimizer, "non-blockwise 8-bit state; use block_wise=True")
        return bits
    raise _unsupported(optimizer)


def to_paged_optimizer(optimizer: torch.optim.Optimizer, config: PagingConfig | None = None) -> torch.optim.Optimizer:
    """A paged optimizer equivalent to ``optimizer`` (same group dicts, same state).

    Args:
        optimizer: a supported optimizer (see :data:`SUPPORTED_OPTIMIZERS`); already paged ones
            are returned unchanged.
        config: how to page (default :class:`PagingConfig`).

    Raises:
        UnsupportedOptimizerError: for other optimizer classes or options; the message lists
            the supported ones.
        PageStoreSetupError: when the page store cannot reserve its memory or disk.

    Example:
        >>> model = torch.nn.Linear(8, 8)
        >>> paged = to_paged_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> type(paged).__name__
        'PagedAdamW'
    """
    config = config or PagingConfig()
    if isinstance(optimizer, PagedOptimizer):
        return optimizer
    source_bits = _describe(optimizer)
    if getattr(optimizer, "is_paged", False) and config.implementation == "bitsandbytes":
        return optimizer  # bitsandbytes' own paged optimizer, as asked
    bits = config.optim_bits or source_bits
    groups = optimizer.param_groups
    parameters = [p for group in groups for p in group["params"]]
    if not parameters:
        raise PagedOptimizerError("the optimizer has no parameters to page.")
    device = parameters[0].device
    defaults = optimizer.defaults
    hyper = {
        "lr": defaults["lr"],
        "betas": tuple(defaults["betas"]),
        "eps": defaults["eps"],
        "weight_decay": defaults["weight_decay"],
    }
    if config.implementation == "bitsandbytes":
        return _bitsandbytes_paged(groups, bits, device, hyper)
    store = make_page_store(config.store, device, config.budget_bytes, config.page_dir)
    cls = PagedAdamW8bit if bits == 8 else PagedAdamW
    state = optimizer.state_dict() if optimizer.state else None
    paged = cls(groups, **hyper, store=store, page_elements=config.page_elements)
    if state is not None:
        if bits != source_bits:
            raise PagedOptimizerError(
                f"{type(optimizer).__name__} already has {source_bits}-bit state, which cannot become {bits}-bit; "
                "convert before the first step or keep optim_bits=None."
            )
        paged.load_state_dict(state)
    return paged


def _bitsandbytes_paged(
    groups: list[dict[str, Any]], bits: int, device: torch.device, hyper: dict[str, Any]
) -> torch.optim.Optimizer:
    if device.type != "cuda":
        raise PagedOptimizerError(
            f"implementation='bitsandbytes' pages through CUDA unified memory, but the parameters are on {device}: "
            "bitsandbytes' paged optimizers silently run unpaged there. Use implementation='native' "
            "(store='mmap' with a budget_bytes pages on CPU)."
        )
    import bitsandbytes as bnb  # lazy: importing it is slow and only this path needs it

    cls = bnb.optim.PagedAdamW8bit if bits == 8 else bnb.optim.PagedAdamW32bit
    return cls(groups, **hyper)


def repage_bitsandbytes_state(optimizer: torch.optim.Optimizer) -> int:
    """Move a bitsandbytes paged optimizer's state back into paged (managed) buffers; return how many.

    ``load_state_dict`` of bitsandbytes' optimizers (and Lightning's state move after it)
    leaves ordinary device tensors, so a resumed run is no longer paged (bitsandbytes#1381).
    This re-creates the paged buffers bitsandbytes would have made (parameters of at least
    100k elements) and copies the state in. Needs CUDA; not run here (no GPU).
    """
    if not getattr(optimizer, "is_paged", False):
        return 0
    import bitsandbytes.functional as bnb_functional

    moved = 0
    for param, state in optimizer.state.items():
        if param.numel() < _BNB_PAGED_THRESHOLD:
            continue
        for key in ("state1", "state2"):
            tensor = state.get(key)
            if isinstance(tensor, torch.Tensor) and not getattr(tensor, "is_paged", False):
                paged = bnb_functional.get_paged(*tensor.shape, dtype=tensor.dtype, device=tensor.device)
                paged.copy_(tensor)
                optimizer.page_mng.paged_tensors.append(paged)
                state[key] = paged
                moved += 1
    return moved


def repoint_lr_schedulers(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Make every scheduler (or Lightning ``LRSchedulerConfig``) of ``old`` drive ``new``; return how many.

    The group dicts are shared, so learning rates the schedulers set reach ``new``; the new
    optimizer's ``step`` is wrapped like torch wraps an optimizer's ``step`` for its schedulers,
    so the "scheduler stepped before optimizer" check keeps working.
    """
    count = 0
    for item in schedulers:
        scheduler = getattr(item, "scheduler", item)
        if getattr(scheduler, "optimizer", None) is old:
            scheduler.optimizer = new
            count += 1
    if count:
        _track_step_calls(new)
    return count


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = optimizer.step

    @wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
