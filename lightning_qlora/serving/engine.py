"""Continuous-batching generation over one 4-bit base and many adapters (S-LoRA style).

Requests are submitted from any thread and join the running batch between steps (continuous
batching, as Orca / vLLM). Each step admits waiting requests -- pinning their adapter in the pool
(loading it, evicting idle ones) and allocating KV pages for prompt plus ``max_tokens`` -- and
then runs ONE batched forward in which the new prompts are prefilled and every running request
decodes its next token, each row with its own adapter (:class:`PagedLlama` + BGMV). So requests
that arrive within one step share it, and an arrival never costs the running ones an extra
pass. Finished, stopped or cancelled requests free their pages at once. Tokens stream to a
:class:`RequestHandle` (iterate it, or ``async for`` with an asyncio loop).

Failures stay with their request: an adapter that cannot be served (unreadable, another model's
shapes, a rank its config contradicts, modules serving does not adapt) fails only the requests
for it, with a typed error (:mod:`.errors`, 422), at submission or -- if its files changed since
-- at admission; a forward pass that raises fails the requests of that pass and frees their
pages. A request that cannot be admitted within ``max_queue_wait_s`` fails with
:class:`PoolExhaustedError` (503, with a retry-after estimate).

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
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.serving.errors import (
    InvalidRequestError,
    PoolExhaustedError,
    RequestTooLargeError,
    ServerConfigError,
    UnknownAdapterError,
)
from lightning_qlora.serving.handles import GenerationEvent, RequestHandle
from lightning_qlora.serving.paged_llama import PagedLlama, SequenceStep, StepLoRA, adaptable_shapes
from lightning_qlora.serving.pool import PagePool
from lightning_qlora.serving.prefix_cache import CachedBlock, PrefixCache
from lightning_qlora.serving.registry import AdapterRegistry, LoadedAdapter
from lightning_qlora.serving.sampling import SamplingParams, find_stop, sample_next, stable_prefix_length

log = logging.getLogger(__name__)
BASE_MODEL = "base"

__all__ = ["BASE_MODEL", "GenerationEngine", "GenerationEvent", "RequestHandle"]


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    adapter_name: str | None
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    submitted: float
    adapter: LoadedAdapter | None = None
    pages: list[int] = field(default_factory=list)  # its own KV pages
    blocks: list[CachedBlock] = field(default_factory=list)  # prompt blocks it shares with the prefix cache
    page_table: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    past: int = 0
    streamed: int = 0
    logits: list[torch.Tensor] | None = None


def _check_positive(name: str, value: Any, kind: type = int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise ServerConfigError(
            f"{name}={value!r} must be a positive {'number' if kind is float else 'integer'}"
            f"{' or None' if optional else ''}."
        )


class GenerationEngine:
    """Serves one (4-bit) decoder base -- Llama, Qwen2, Mistral -- with many LoRA adapters from a shared page pool.

    Args:
        model: a transformers causal LM of a supported family, quantized or not (``quantize_linears``).
        tokenizer: its tokenizer (EOS ends a completion).
        adapters_dir: directory of adapter sub-directories (served under their names).
        num_pages / page_size: the pool; ``page_size`` defaults to the longest factor row.
        max_batch_size: most requests in one step.
        max_prompt_tokens: longer prompts are refused (413); default: the model's context minus 1.
        max_queue_wait_s: a request not admitted within this many seconds fails with 503.
        prefix_caching: keep the KV of prompt blocks for later requests with the same adapter and
            leading tokens (:mod:`~lightning_qlora.serving.prefix_cache`); they prefill only the rest.
        record_logits: keep each step's logits on the request (tests).

    Raises:
        ServerConfigError: an argument is out of range (checked before anything is allocated).
        UnsupportedModelError: the model's family is not served (the message lists those that are).
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
        max_queue_wait_s: float = 60.0,
        prefix_caching: bool = True,
        record_logits: bool = False,
    ) -> None:
        _check_positive("num_pages", num_pages)
        _check_positive("page_size", page_size, optional=True)
        _check_positive("max_batch_size", max_batch_size)
        _check_positive("max_prompt_tokens", max_prompt_tokens, optional=True)
        _check_positive("max_queue_wait_s", max_queue_wait_s, kind=float)
        if page_size is None:
            page_size = max(max(shape) for shape in adaptable_shapes(model))
        self.pool = PagePool(num_pages, page_size)
        self.runner = PagedLlama(model, self.pool)
        self.registry = AdapterRegistry(self.pool, self.runner.module_shapes, adapters_dir)
        self.prefix_cache: PrefixCache | None = None
        if prefix_caching:
            self.prefix_cache = PrefixCache(self.pool, self.runner.num_layers, self.runner.tokens_per_page)
            self.registry.reclaim = self.prefix_cache.evict_until_free
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prompt_tokens = max_prompt_tokens or self.runner.max_positions - 1
        self.max_queue_wait_s = float(max_queue_wait_s)
        self.record_logits = record_logits
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._incoming: deque[_Request] = deque()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # running mean of a step's wall time (for Retry-After estimates)
        self._tables: tuple[tuple[int, ...], StepLoRA] | None = None  # last step's adapter tables, reused
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
        stream: bool = True,
    ) -> RequestHandle:
        """Queue a request; ``adapter`` None or ``"base"`` means the base model alone.

        ``stream=False``: the handle gets one event, the whole completion, when the request ends.

        Raises:
            UnknownAdapterError: ``adapter`` is not registered.
            AdapterFormatError: the adapter's files cannot be served on this base (422).
            InvalidRequestError: empty prompt; :class:`RequestTooLargeError` (413) for a prompt over
                ``max_prompt_tokens`` or a request that could not fit in the whole pool.
        """
        params = params or SamplingParams()
        name = None if adapter in (None, BASE_MODEL) else adapter
        if name is not None and name not in self.registry.known():
            raise UnknownAdapterError(name, self.models())
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False)) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty; send at least one token.")
        if len(ids) > self.max_prompt_tokens:
            raise RequestTooLargeError(
                f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}."
            )
        total = len(ids) + params.max_tokens
        if total > self.runner.max_positions:
            raise RequestTooLargeError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.runner.max_positions} tokens."
            )
        needed = self.runner.kv_pages_for(total) + (self.registry.pages_needed(name) if name else 0)
        if needed > self.pool.num_pages:
            raise RequestTooLargeError(
                f"this request needs {needed} pool pages (KV cache + adapter) but the pool has "
                f"{self.pool.num_pages}; lower max_tokens or the prompt."
            )
        generator = None
        if params.temperature > 0:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        handle = RequestHandle(f"req-{next(self._ids)}", loop, stream)
        request = _Request(
            handle, name, ids, params, generator, time.monotonic(), logits=[] if self.record_logits else None
        )
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
            if not self.step():  # idle, or waiting for pages: sleep until a submission (never busy-loop)
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def run_until_idle(self) -> None:
        """Step in this thread until no request is left (tests, offline use)."""
        while self.has_work():
            if not self.step():
                time.sleep(0.01)

    def has_work(self) -> bool:
        return bool(self._incoming or self._waiting or self._running)

    def step(self) -> bool:
        """Admit what fits, then one forward: prefill the admitted, decode the running; whether it ran."""
        while self._incoming:
            self._waiting.append(self._incoming.popleft())
        for request in [r for r in self._waiting if r.handle.cancelled.is_set()]:
            self._waiting.remove(request)
            self._finish(request, "cancelled", emit_rest=False)
        for request in [r for r in self._running if r.handle.cancelled.is_set()]:
            self._finish(request, "cancelled", emit_rest=False)
        if not self._waiting and not self._running:
            return False
        admitted = self._admit()
        self._expire_waiting()
        if not admitted and not self._running:
            return False
        started = time.perf_counter()
        self._forward(self._running + admitted, len(self._running))
        self._step_seconds = 0.8 * self._step_seconds + 0.2 * (time.perf_counter() - started)
        return True

    def _admit(self) -> list[_Request]:
        """Take waiting requests (first come, first served) while the batch and the pool have room."""
        admitted: list[_Request] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting[0]
            adapter = None
            if request.adapter_name is not None:
                try:
                    adapter = self.registry.acquire(request.adapter_name)
                except PoolExhaustedError:
                    break  # wait for running requests to free pages
                except Exception as error:  # noqa: BLE001 -- this adapter cannot be served: fail only its request
                    self._waiting.popleft()
                    self._finish(request, "error", emit_rest=False, error=error)
                    continue
            blocks = self.prefix_cache.lookup(adapter, request.prompt) if self.prefix_cache is not None else []
            kv_pages = self.runner.kv_pages_for(len(request.prompt) + request.params.max_tokens)
            kv_pages -= len(blocks) * self.runner.num_layers  # the cached prefix's pages are shared
            if self.pool.free_pages < kv_pages and not self.registry.evict_until_free(kv_pages):
                if blocks:
                    self.prefix_cache.release(blocks)
                if adapter is not None:
                    self.registry.release(adapter)
                break
            self._waiting.popleft()
            request.adapter = adapter
            request.blocks = blocks
            request.pages = self.pool.allocate(kv_pages, owner=f"kv:{request.handle.id}")
            own = torch.tensor(request.pages, dtype=torch.int64).view(self.runner.num_layers, -1)
            shared = [torch.tensor(b.pages, dtype=torch.int64).view(-1, 1) for b in blocks]
            request.page_table = torch.cat([*shared, own], dim=1)
            request.past = len(blocks) * self.runner.tokens_per_page  # prefill starts after the cached prefix
            admitted.append(request)
        return admitted

    def _expire_waiting(self) -> None:
        """Fail (503) the waiting requests that could not be admitted within ``max_queue_wait_s``."""
        now = time.monotonic()
        for request in [r for r in self._waiting if now - r.submitted > self.max_queue_wait_s]:
            self._waiting.remove(request)
            if len(self._running) >= self.max_batch_size:
                why = f"the batch is full ({len(self._running)} = max_batch_size requests running)"
            else:
                why = (
                    f"the page pool has {self.pool.free_pages} free pages of {self.pool.num_pages} and the running "
                    "requests' adapters and KV cache hold the rest"
                )
            remaining = min((r.params.max_tokens - len(r.generated) for r in self._running), default=1)
            retry = min(60, math.ceil(remaining * self._step_seconds))
            error = PoolExhaustedError(
                f"request waited {now - request.submitted:.1f} s (max_queue_wait_s="
                f"{self.max_queue_wait_s:g}) without being admitted: {why}. Retry later.",
                retry_after=retry,
            )
            self._finish(request, "error", emit_rest=False, error=error)

    def _forward(self, batch: list[_Request], decoding: int) -> None:
        """One pass over ``batch``: its first ``decoding`` requests decode one token, the rest are prefilled."""
        steps = [SequenceStep(torch.tensor(r.generated[-1:]), r.past, r.page_table) for r in batch[:decoding]]
        steps += [SequenceStep(torch.tensor(r.prompt[r.past :]), r.past, r.page_table) for r in batch[decoding:]]
        try:
            logits = self.runner.forward(steps, self._step_lora(batch, steps))
        except Exception as error:  # noqa: BLE001 -- one bad pass must not kill the server; fail its requests
            log.exception("generation step failed")
            for request in batch:
                self._finish(request, "error", emit_rest=False, error=error)
            return
        self._running = list(batch)
        if self.prefix_cache is not None:
            for request in batch[decoding:]:  # prefilled now: keep its full prompt blocks for later requests
                self.prefix_cache.store(
                    request.adapter, request.prompt, request.page_table, request.blocks, request.pages
                )
        for request, step, row in zip(batch, steps, logits):
            request.past += step.tokens.numel()
            self._accept(request, row)

    def _step_lora(self, requests: list[_Request], steps: list[SequenceStep]) -> StepLoRA | None:
        """Slot per distinct adapter of the step; each sequence's rows point at its slot."""
        adapters: dict[str, LoadedAdapter] = {}
        for request in requests:
            if request.adapter is not None:
                adapters.setdefault(request.adapter.name, request.adapter)
        if not adapters:
            return None
        key = tuple(id(a) for a in adapters.values())
        if self._tables is not None and self._tables[0] == key:  # same adapters as the last step: same tables
            tables = self._tables[1]
        else:
            width = max(a.a_rows.shape[1] for a in adapters.values())
            modules = len(self.runner.module_names)
            a_rows = torch.zeros(modules, len(adapters), width, dtype=torch.int64)
            b_rows = torch.zeros_like(a_rows)
            for slot, adapter in enumerate(adapters.values()):
                a_rows[:, slot, : adapter.a_rows.shape[1]] = adapter.a_rows
                b_rows[:, slot, : adapter.b_rows.shape[1]] = adapter.b_rows
            ranks = torch.stack([a.ranks for a in adapters.values()], dim=1)
            scales = torch.stack([a.scales for a in adapters.values()], dim=1)
            tables = StepLoRA(
                a_rows, b_rows, ranks, scales, torch.empty(0, dtype=torch.int64), (ranks > 0).any(dim=1).tolist()
            )
            self._tables = (key, tables)
        slot_of = {name: slot for slot, name in enumerate(adapters)}
        slots = [slot_of[r.adapter.name] if r.adapter is not None else -1 for r in requests]
        counts = [step.tokens.numel() for step in steps]
        row_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(counts))
        return StepLoRA(tables.a_rows, tables.b_rows, tables.ranks, tables.scales, row_slots, tables.active)

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

    def _finish(
        self,
        request: _Request,
        reason: str,
        text: str | None = None,
        emit_rest: bool = True,
        error: BaseException | None = None,
    ) -> None:
        """End ``request``: free its pages, unpin its adapter, send its last event (never raises for it)."""
        if request in self._running:
            self._running.remove(request)
        try:
            self.pool.free(request.pages)
        finally:
            request.pages = []
            if request.blocks:
                self.prefix_cache.release(request.blocks)  # empties the list
            if request.adapter is not None:
                adapter, request.adapter = request.adapter, None
                self.registry.release(adapter)
        self.finish_reasons[reason] += 1
        counts = (len(request.prompt), len(request.generated))
        if error is not None:
            request.handle._put(GenerationEvent.failure(error, *counts))
        else:
            rest = ""
            if emit_rest:
                full = self._text(request) if text is None else text
                rest = full[request.streamed :]
            request.handle._put(GenerationEvent(rest, reason, *counts))
        if self.record_logits:
            self.finished.append(request)
