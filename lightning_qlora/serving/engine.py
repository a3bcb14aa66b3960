"""Continuous-batching generation over one 4-bit base and many adapters (S-LoRA style).

Requests are submitted from any thread and join the running batch between decode steps
(continuous batching, as Orca / vLLM): each step first admits waiting requests -- pinning their
adapter in the pool (loading it, evicting idle ones) and allocating KV pages for prompt plus
``max_tokens`` -- and prefills them, then decodes one token for every running request in one
batched forward in which each row uses its own adapter (:class:`PagedLlama` + BGMV). Finished,
stopped or cancelled requests free their pages at once. Tokens stream to a
:class:`RequestHandle` (iterate it, or ``async for`` with an asyncio loop).

KV pages are allocated for the whole request at admission, so a running request never waits for
memory mid-stream; a request that cannot be admitted waits (first come, first served).

Example:
    >>> engine = GenerationEngine(model, tokenizer, adapters_dir="adapters/", num_pages=4096)
    >>> engine.start()
    >>> handle = engine.submit("Hello", adapter="support-bot", params=SamplingParams(max_tokens=16))
    >>> print(handle.text())
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.serving.errors import InvalidRequestError, PoolExhaustedError, UnknownAdapterError
from lightning_qlora.serving.paged_llama import ADAPTABLE_PROJECTIONS, PagedLlama, SequenceStep, StepLoRA
from lightning_qlora.serving.pool import PagePool
from lightning_qlora.serving.registry import AdapterRegistry, LoadedAdapter
from lightning_qlora.serving.sampling import SamplingParams, find_stop, sample_next, stable_prefix_length

log = logging.getLogger(__name__)
BASE_MODEL = "base"


@dataclass
class GenerationEvent:
    """A piece of a stream: new ``text`` (may be empty), and on the last event ``finish_reason``
    (``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``) with token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class RequestHandle:
    """The caller's side of one request: iterate (or ``async for``) its events; ``cancel()`` frees it."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = request_id
        self._loop = loop
        self._queue: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def _put(self, event: GenerationEvent) -> None:
        if event.finish_reason is not None:
            self.done.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        else:
            self._queue.put(event)

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's pages at its next step."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[GenerationEvent]:
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def text(self) -> str:
        """Block until finished; the whole completion."""
        return "".join(event.text for event in self)


@dataclass
class _Request:
    handle: RequestHandle
    adapter_name: str | None
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    adapter: LoadedAdapter | None = None
    pages: list[int] = field(default_factory=list)
    page_table: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    past: int = 0
    streamed: int = 0
    logits: list[torch.Tensor] | None = None


class GenerationEngine:
    """Serves one (4-bit) Llama base with many LoRA adapters from a shared page pool.

    Args:
        model: a transformers Llama causal LM, already quantized (``quantize_linears``).
        tokenizer: its tokenizer (EOS ends a completion).
        adapters_dir: directory of adapter sub-directories (served under their names).
        num_pages / page_size: the pool; ``page_size`` defaults to the longest factor row.
        max_batch_size: most requests decoding together.
        max_prompt_tokens: longer prompts are refused (413); default: the model's context minus 1.
        record_logits: keep each step's logits on the request (tests).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        adapters_dir: str | Path | None = None,
        num_pages: int = 4096,
        page_size: int | None = None,
        max_batch_size: int = 16,
        max_prompt_tokens: int | None = None,
        record_logits: bool = False,
    ) -> None:
        if page_size is None:
            page_size = max(max(shape) for shape in _module_shapes(model))
        self.pool = PagePool(num_pages, page_size)
        self.runner = PagedLlama(model, self.pool)
        self.registry = AdapterRegistry(self.pool, self.runner.module_shapes, adapters_dir)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prompt_tokens = max_prompt_tokens or self.runner.max_positions - 1
        self.record_logits = record_logits
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._incoming: deque[_Request] = deque()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished: list[_Request] = []  # with record_logits only
        self.finish_reasons: Counter[str] = Counter()

    # -- submission ----------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Names a request may use: ``"base"`` and every registered adapter."""
        return [BASE_MODEL, *self.registry.known()]

    def submit(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request; ``adapter`` None or ``"base"`` means the base model alone.

        Raises:
            UnknownAdapterError: ``adapter`` is not registered.
            InvalidRequestError: empty prompt, prompt over ``max_prompt_tokens`` (status 413), or a
                request that could not fit in the whole pool.
        """
        params = params or SamplingParams()
        name = None if adapter in (None, BASE_MODEL) else adapter
        if name is not None and name not in self.registry.known():
            raise UnknownAdapterError(name, self.models())
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False)) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty; send at least one token.")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                                      f"{self.max_prompt_tokens}.", status=413)  # fmt: skip
        total = len(ids) + params.max_tokens
        if total > self.runner.max_positions:
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                      f"model's context of {self.runner.max_positions} tokens.", status=413)  # fmt: skip
        needed = self.runner.kv_pages_for(total) + (self.registry.pages_needed(name) if name else 0)
        if needed > self.pool.num_pages:
            raise InvalidRequestError(f"this request needs {needed} pool pages (KV cache + adapter) but the pool has "
                                      f"{self.pool.num_pages}; lower max_tokens or the prompt.", status=413)  # fmt: skip
        generator = None
        if params.temperature > 0:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        handle = RequestHandle(f"req-{next(self._ids)}", loop)
        request = _Request(handle, name, ids, params, generator, logits=[] if self.record_logits else None)
        self._incoming.append(request)
        self._wake.set()
        return handle

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a background thread until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lightning-qlora-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def run_until_idle(self) -> None:
        """Step in this thread until no request is left (tests, offline use)."""
        while self.step():
            pass

    def has_work(self) -> bool:
        return bool(self._incoming or self._waiting or self._running)

    def step(self) -> bool:
        """Admit + prefill what fits, then decode one token for every running request; whether work was done."""
        while self._incoming:
            self._waiting.append(self._incoming.popleft())
        for request in [r for r in self._waiting if r.handle.cancelled.is_set()]:
            self._waiting.remove(request)
            self.finish_reasons["cancelled"] += 1
            request.handle._put(GenerationEvent("", "cancelled", len(request.prompt), 0))
        for request in [r for r in self._running if r.handle.cancelled.is_set()]:
            self._finish(request, "cancelled", emit_rest=False)
        if not self._waiting and not self._running:
            return False
        try:
            self._admit()
            if self._running:
                self._decode()
        except Exception as error:  # noqa: BLE001 -- one bad step must not kill the server; fail its requests
            log.exception("generation step failed")
            for request in list(self._running):
                self._finish(request, "error", emit_rest=False, error=repr(error))
        return True

    def _admit(self) -> None:
        """Admit what fits, then prefill all newly admitted prompts in one forward pass."""
        admitted: list[tuple[_Request, SequenceStep]] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting[0]
            try:
                adapter = self.registry.acquire(request.adapter_name) if request.adapter_name else None
            except PoolExhaustedError:
                break  # wait for running requests to free pages
            kv_pages = self.runner.kv_pages_for(len(request.prompt) + request.params.max_tokens)
            if self.pool.free_pages < kv_pages and not self.registry.evict_until_free(kv_pages):
                if adapter is not None:
                    self.registry.release(adapter)
                break
            self._waiting.popleft()
            request.adapter = adapter
            request.pages = self.pool.allocate(kv_pages, owner=f"kv:{request.handle.id}")
            request.page_table = torch.tensor(request.pages, dtype=torch.int64).view(self.runner.num_layers, -1)
            admitted.append((request, SequenceStep(torch.tensor(request.prompt), 0, request.page_table)))
        if not admitted:
            return
        requests = [request for request, _ in admitted]
        steps = [step for _, step in admitted]
        logits = self.runner.forward(steps, self._step_lora(requests, steps))
        for request, row in zip(requests, logits):
            request.past = len(request.prompt)
            self._running.append(request)
            self._accept(request, row)

    def _decode(self) -> None:
        batch = list(self._running)
        steps = [SequenceStep(torch.tensor(r.generated[-1:]), r.past, r.page_table) for r in batch]
        logits = self.runner.forward(steps, self._step_lora(batch, steps))
        for request, row in zip(batch, logits):
            request.past += 1
            self._accept(request, row)

    def _step_lora(self, requests: list[_Request], steps: list[SequenceStep]) -> StepLoRA | None:
        """Slot per distinct adapter of the step; each sequence's rows point at its slot."""
        adapters: dict[str, LoadedAdapter] = {}
        for request in requests:
            if request.adapter is not None:
                adapters.setdefault(request.adapter.name, request.adapter)
        if not adapters:
            return None
        slot_of = {name: slot for slot, name in enumerate(adapters)}
        width = max(a.a_rows.shape[1] for a in adapters.values())
        modules = len(self.runner.module_names)
        a_rows = torch.zeros(modules, len(adapters), width, dtype=torch.int64)
        b_rows = torch.zeros_like(a_rows)
        for slot, adapter in enumerate(adapters.values()):
            a_rows[:, slot, : adapter.a_rows.shape[1]] = adapter.a_rows
            b_rows[:, slot, : adapter.b_rows.shape[1]] = adapter.b_rows
        ranks = torch.stack([a.ranks for a in adapters.values()], dim=1)
        scales = torch.stack([a.scales for a in adapters.values()], dim=1)
        row_slots = []
        for request, step in zip(requests, steps):
            slot = slot_of[request.adapter.name] if request.adapter is not None else -1
            row_slots.append(torch.full((step.tokens.numel(),), slot, dtype=torch.int64))
        return StepLoRA(a_rows, b_rows, ranks, scales, torch.cat(row_slots), (ranks > 0).any(dim=1).tolist())

    # -- tokens out ----------------------------------------------------------------------------
    def _accept(self, request: _Request, logits: torch.Tensor) -> None:
        if request.logits is not None:
            request.logits.append(logits.clone())
        token = sample_next(logits, request.params, request.generator)
        if token in self.eos_ids:
            self._finish(request, "stop")
            return
        request.generated.append(token)
        text = self._text(request)
        stop_at = find_stop(text, request.params.stop)
        if stop_at is not None:
            self._finish(request, "stop", text=text[:stop_at])
        elif len(request.generated) >= request.params.max_tokens:
            self._finish(request, "length", text=text)
        else:
            ready = stable_prefix_length(text, request.params.stop)
            if ready > request.streamed:
                request.handle._put(GenerationEvent(text[request.streamed : ready]))
                request.streamed = ready

    def _text(self, request: _Request) -> str:
        return self.tokenizer.decode(request.generated, skip_special_tokens=True)

    def _finish(self, request: _Request, reason: str, text: str | None = None, emit_rest: bool = True,
                error: str | None = None) -> None:  # fmt: skip
        if request in self._running:
            self._running.remove(request)
        self.pool.free(request.pages)
        request.pages = []
        if request.adapter is not None:
            self.registry.release(request.adapter)
        rest = ""
        if emit_rest:
            full = self._text(request) if text is None else text
            rest = full[request.streamed :]
        self.finish_reasons[reason] += 1
        request.handle._put(GenerationEvent(rest, reason, len(request.prompt), len(request.generated), error))
        if self.record_logits:
            self.finished.append(request)


def _module_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(in, out)`` of every adaptable projection (the rows the pool pages must hold)."""
    shapes = []
    for layer in model.model.layers:
        for projection in ADAPTABLE_PROJECTIONS:
            module = layer.get_submodule(projection)
            shapes.append((module.in_features, module.out_features))
    return shapes
