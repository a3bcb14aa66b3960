"""``PagedOptimizer``: the page-by-page update loop shared by the paged optimizers.

State lives in a :class:`~lightning_qlora.optim.stores.PageStore`, reserved for every
parameter when the optimizer is built (so a full disk fails then, not mid-step). A step walks
the pages of all parameters with a gradient in order; for each it fetches the page (pinning
it), starts the prefetch of the next one, runs the subclass's element-wise update on the
page's slice of the parameter and gradient, and releases the page::

    for page i:  fetch(i) -> prefetch(i + 1) -> update(i) -> release(i)

so at most two pages (plus the LRU cache, within the budget) are resident at any time.

Checkpoints: :meth:`state_dict` materializes the state page by page into ordinary tensors in
the format of the optimizer it replaces (``torch.optim.AdamW`` or bitsandbytes'
``AdamW8bit``), so checkpoints interoperate both ways; :meth:`load_state_dict` writes such
tensors back into the pages. Saving therefore needs the state's size in host memory for a
moment, as any ``torch.save`` does.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from typing_extensions import override

from lightning_qlora.optim.errors import PageBudgetError, PagedOptimizerError
from lightning_qlora.optim.layout import Page, PageLayout, PagedState, page_ranges
from lightning_qlora.optim.stores import PageStore, format_bytes, make_page_store, round_up

#: Page sizes are multiples of this many elements (a multiple of the 8-bit block size 256, and
#: 64 KiB-aligned page boundaries for 1-byte slots).
PAGE_ELEMENT_MULTIPLE = 4096
#: Default page size without a budget: 4 MiB per float32 slot.
DEFAULT_PAGE_ELEMENTS = 1 << 20


class PagedOptimizer(torch.optim.Optimizer):
    """Base class: per-parameter state in pages of a store, updated page by page.

    Subclasses define the state layout (:meth:`_layout`), the per-parameter step bookkeeping
    (:meth:`_begin_param`) and the element-wise update of one page (:meth:`_update_page`).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        defaults: default hyperparameters of a group.
        store: where the state lives; default :func:`~lightning_qlora.optim.stores.make_page_store`
            ``("auto", device of the parameters)`` (host memory on CPU, managed memory on CUDA).
        page_elements: parameter elements per page, a multiple of 4096; default the largest that
            lets two pages fit the store's budget (at most 2^20), or 2^20 without a budget.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        store: PageStore | None = None,
        page_elements: int | None = None,
    ) -> None:
        self.store: PageStore | None = None
        self._paged: dict[torch.Tensor, PagedState] = {}
        super().__init__(params, defaults)
        parameters = [p for group in self.param_groups for p in group["params"]]
        self.store = store if store is not None else make_page_store("auto", parameters[0].device)
        self.page_elements = self._resolve_page_elements(page_elements, parameters)
        self._allocate(parameters)

    # -- subclass interface -------------------------------------------------------------------

    @abstractmethod
    def _layout(self, param: torch.Tensor) -> PageLayout:
        """The slots of ``param``'s state pages."""

    @abstractmethod
    def _initial_step(self) -> Any:
        """The ``step`` entry of a parameter that was never updated."""

    @abstractmethod
    def _begin_param(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any]) -> Any:
        """Advance ``state["step"]`` and return what every page update of ``param`` needs."""

    @abstractmethod
    def _update_page(
        self, context: Any, slots: dict[str, torch.Tensor], param: torch.Tensor, grad: torch.Tensor
    ) -> None:
        """Update one page in place: ``slots`` are views into the page, ``param``/``grad`` 1-D slices."""

    def _export_extra(self, param: torch.Tensor) -> dict[str, Any]:
        """Extra entries of a parameter's checkpoint state (e.g. quantization maps)."""
        return {}

    # -- torch.optim.Optimizer ------------------------------------------------------------------

    @override
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.store is not None:  # groups added after construction get their pages now
            self._allocate(param_group["params"])

    @override
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[tuple[Any, torch.Tensor, torch.Tensor, PagedState, Page]] = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise PagedOptimizerError(f"{type(self).__name__} does not support sparse gradients.")
                context = self._begin_param(group, param, self.state[param])
                paged = self._paged[param]
                flat_param, flat_grad = param.view(-1), param.grad.reshape(-1)
                work.extend((context, flat_param, flat_grad, paged, page) for page in paged.pages)
        self._run_pages(work)
        return loss

    def _run_pages(self, work: list[tuple[Any, torch.Tensor, torch.Tensor, PagedState, Page]]) -> None:
        store = self._require_store()
        for index, (context, flat_param, flat_grad, paged, page) in enumerate(work):
            view = store.fetch(page.extent)
            try:
                if index + 1 < len(work):
                    store.prefetch(work[index + 1][4].extent)
                slots = paged.layout.views(view, page.stop - page.start)
                self._update_page(context, slots, flat_param[page.start : page.stop], flat_grad[page.start : page.stop])
            finally:
                store.release(page.extent, view, dirty=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        store = self._require_store()
        store.synchronize()
        packed = super().state_dict()
        parameters = [p for group in self.param_groups for p in group["params"]]
        exported = {}
        for index, entry in packed["state"].items():
            param = parameters[index]
            if not self._was_updated(entry):  # never stepped: absent, as in torch's optimizers
                continue
            exported[index] = {"step": _copy_step(entry["step"]), **self._export(param), **self._export_extra(param)}
        packed["state"] = exported
        return packed

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise PagedOptimizerError(
                "an optimizer state dict needs 'state' and 'param_groups' entries (from optimizer.state_dict())."
            )
        # let torch validate and restore the groups; the state goes into the pages below
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        parameters = [p for group in self.param_groups for p in group["params"]]
        loaded = {int(index): entry for index, entry in state_dict["state"].items()}
        unknown = sorted(set(loaded) - set(range(len(parameters))))
        if unknown:
            raise PagedOptimizerError(
                f"the state dict has state for parameter indices {unknown} but the optimizer has {len(parameters)}."
            )
        for index, param in enumerate(parameters):
            entry = loaded.get(index)
            self.state[param] = {"step": self._initial_step(), "paged": self._paged[param]}
            self._import(index, param, entry)
            if entry is not None:
                self.state[param]["step"] = _copy_step(entry["step"])

    # -- pages ----------------------------------------------------------------------------------

    def _require_store(self) -> PageStore:
        if self.store is None:  # only during torch's __init__, before the store exists
            raise PagedOptimizerError(f"{type(self).__name__} has no page store yet.")
        return self.store

    def _page_bytes(self, layout: PageLayout, elements: int) -> int:
        return round_up(layout.nbytes(elements), self._require_store().alignment)

    def _resolve_page_elements(self, requested: int | None, parameters: list[torch.Tensor]) -> int:
        store = self._require_store()
        if requested is not None:
            if (
                isinstance(requested, bool)
                or not isinstance(requested, int)
                or requested <= 0
                or requested % PAGE_ELEMENT_MULTIPLE
            ):
                raise PagedOptimizerError(
                    f"page_elements={requested!r} must be a positive multiple of {PAGE_ELEMENT_MULTIPLE}."
                )
        largest: dict[PageLayout, int] = {}
        for param in parameters:
            layout = self._layout(param)
            largest[layout] = max(largest.get(layout, 0), param.numel())

        def two_pages(elements: int) -> int:
            return 2 * max(self._page_bytes(layout, min(elements, numel)) for layout, numel in largest.items())

        elements = requested or DEFAULT_PAGE_ELEMENTS
        if store.budget_bytes is not None and requested is None:
            while elements > PAGE_ELEMENT_MULTIPLE and two_pages(elements) > store.budget_bytes:
                elements -= PAGE_ELEMENT_MULTIPLE
        if store.budget_bytes is not None and two_pages(elements) > store.budget_bytes:
            raise PageBudgetError(
                f"the store's budget of {format_bytes(store.budget_bytes)} cannot hold two pages of "
                f"{elements} elements ({format_bytes(two_pages(elements))} with {type(self).__name__}'s state); "
                f"raise budget_bytes to at least {two_pages(elements)}"
                + ("" if requested is None else " or lower page_elements")
                + "."
            )
        return elements

    def _allocate(self, parameters: Iterable[torch.Tensor]) -> None:
        store = self._require_store()
        todo = []
        for param in parameters:
            if param in self._paged:
                continue
            if param.device != store.device:
                raise PagedOptimizerError(
                    f"a parameter is on {param.device} but the page store updates on {store.device}; build the "
                    "store for the parameters' device (make_page_store(name, device=...))."
                )
            if not param.is_contiguous():
                raise PagedOptimizerError(
                    f"{type(self).__name__} pages contiguous parameters only; got one of shape "
                    f"{tuple(param.shape)} with strides {param.stride()}."
                )
            todo.append(param)
        if not todo:
            return
        ranges = {param: page_ranges(param.numel(), self.page_elements) for param in todo}
        sizes = [self._page_bytes(self._layout(p), stop - start) for p in todo for start, stop in ranges[p]]
        extents = iter(store.allocate(sizes))
        for param in todo:
            pages = [Page(start, stop, next(extents)) for start, stop in ranges[param]]
            self._paged[param] = PagedState(self._layout(param), param.shape, pages)
            self.state[param] = {"step": self._initial_step(), "paged": self._paged[param]}

    def _was_updated(self, entry: dict[str, Any]) -> bool:
        step = entry.get("step", 0)
        return float(step.item() if isinstance(step, torch.Tensor) else step) > 0

    def _export(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of ``param`` as full CPU tensors, read page by page."""
        store = self._require_store()
        paged = self._paged[param]
        full = {slot.name: torch.empty(slot.items(paged.numel), dtype=slot.dtype) for slot in paged.layout.slots}
        for page in paged.pages:
            views = paged.layout.views(store.read(page.extent), page.stop - page.start)
            for slot in paged.layout.slots:
                first = page.start // slot.per
                full[slot.name][first : first + views[slot.name].numel()] = views[slot.name]
        return {
            slot.name: full[slot.name].view(paged.shape) if slot.per == 1 else full[slot.name]
            for slot in paged.layout.slots
        }

    def _import(self, index: int, param: torch.Tensor, entry: dict[str, Any] | None) -> None:
        """Write a checkpoint entry (or zeros if ``None``) into ``param``'s pages."""
        store = self._require_store()
        paged = self._paged[param]
        sources: dict[str, torch.Tensor] = {}
        for slot in paged.layout.slots:
            if entry is None:
                sources[slot.name] = torch.zeros(slot.items(paged.numel), dtype=slot.dtype)
                continue
            value = entry.get(slot.name)
            if not isinstance(value, torch.Tensor) or value.numel() != slot.items(paged.numel):
                expected = ", ".join(f"{s.name} ({s.items(paged.numel)} values)" for s in paged.layout.slots)
                found = ", ".join(
                    f"{k} ({v.numel() if isinstance(v, torch.Tensor) else type(v).__name__})" for k, v in entry.items()
                )
                raise PagedOptimizerError(
                    f"state of parameter {index} (shape {tuple(param.shape)}) has {found}, but {type(self).__name__} "
                    f"expects {expected}; was the checkpoint written by another optimizer or model?"
                )
            sources[slot.name] = value.detach().to("cpu", slot.dtype).reshape(-1)
        for page in paged.pages:
            data = torch.zeros(page.extent.nbytes, dtype=torch.uint8)
            views = paged.layout.views(data, page.stop - page.start)
            for slot in paged.layout.slots:
                first = page.start // slot.per
                views[slot.name].copy_(sources[slot.name][first : first + views[slot.name].numel()])
            store.write(page.extent, data)


def _copy_step(step: Any) -> Any:
    return step.detach().clone().cpu() if isinstance(step, torch.Tensor) else step


def check_hyperparameters(name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise :class:`PagedOptimizerError` for hyperparameters ``torch.optim.AdamW`` would also reject."""
    lr_value = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else math.nan
    if not lr_value >= 0:
        raise PagedOptimizerError(f"{name}: lr={lr!r} must be a number >= 0.")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise PagedOptimizerError(f"{name}: betas={betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999).")
    if not eps >= 0:
        raise PagedOptimizerError(f"{name}: eps={eps!r} must be >= 0.")
    if not weight_decay >= 0:
        raise PagedOptimizerError(f"{name}: weight_decay={weight_decay!r} must be >= 0.")
