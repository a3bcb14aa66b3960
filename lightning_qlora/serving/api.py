"""An OpenAI-compatible LitServe endpoint over :class:`GenerationEngine`.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming with ``"stream": true``, as
server-sent events) and ``GET /v1/models``; the request's ``model`` names the adapter (a
sub-directory of ``adapters_dir``) or ``"base"``. Both endpoints belong to one LitServe spec, so
one inference worker -- one engine, one 4-bit base in memory -- serves them, and LitServe's async
streaming loop hands every concurrent request to the engine at once (continuous batching happens
in the engine, not in LitServe's static batches).

Errors come back before any stream starts, with a JSON ``{"error": {"message": ...}}`` body:
unknown model -> 404 listing the known ones; malformed JSON or bad fields (e.g. negative
``max_tokens``) -> 400; a prompt over the limit -> 413. A client that disconnects mid-stream
cancels its request, which frees its KV pages and unpins its adapter.

Example:
    >>> server = build_server(ServerConfig(adapters_dir="adapters/"))
    >>> server.run(host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import types
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from lightning_qlora.ops import set_kernel_threads
from lightning_qlora.serving.adapter_files import is_adapter_dir
from lightning_qlora.serving.engine import BASE_MODEL, GenerationEngine, _check_positive
from lightning_qlora.serving.errors import (
    InvalidRequestError,
    RequestTooLargeError,
    ServerConfigError,
    UnknownAdapterError,
    http_answer,
)
from lightning_qlora.serving.handles import RequestHandle
from lightning_qlora.serving.sampling import SamplingParams
from lightning_qlora.threads import usable_cores

MODELS = ("tiny", "smollm2")
#: pages in the server's pool by default: 192 MB of float32 pages of 1536 floats for SmolLM2, which
#: hold the four rank 8-32 adapters of ``benchmarks/serving.py`` (one of them on every Linear) and the
#: KV cache of a full batch without evicting (8192 pages reloaded adapters 13-15 times per run)
DEFAULT_NUM_PAGES = 32768


def default_server_threads() -> int:
    """The engine's torch threads when ``threads`` is not given: one per usable core, less one, at least 1.

    The engine is not alone: LitServe's HTTP process (parsing, SSE, the hand-off between processes)
    and the tokenizer run beside it. An engine that takes every core makes them wait for one, and
    its small per-layer ops pay more to wake the extra thread than it saves: on a 2-core machine
    ``threads=2`` decodes slower than ``threads=1`` (see the README's serving figures).
    Usable cores are the process's CPU affinity where the OS reports one (a container or ``taskset``
    may allow fewer than ``os.cpu_count()``).
    """
    return max(1, usable_cores() - 1)


def use_server_threads(threads: int | None = None) -> int:
    """Put this process on the engine's threads: torch on ``threads`` (default :func:`default_server_threads`),
    our compiled kernels on up to every usable core; returns the torch thread count.

    Each kernel measures whether a second thread pays (the ``lm_head``'s 28 MB product does while
    the HTTP process is idle: +4.6% single-stream tok/s in an interleaved A/B); torch's small
    per-layer ops stay on fewer threads. The server does this when it builds its engine; an engine
    run in-process (a benchmark, a profile) calls it to run as the server does.
    """
    threads = threads if threads is not None else default_server_threads()
    torch.set_num_threads(threads)
    set_kernel_threads(max(threads, usable_cores()))
    return threads


@dataclass(frozen=True)
class ServerConfig:
    """What the server loads (picklable: LitServe builds the engine inside its worker process).

    Attributes:
        adapters_dir: directory of adapter sub-directories (ours or PEFT's).
        model: ``"smollm2"`` (SmolLM2-135M-Instruct) or ``"tiny"`` (tests).
        num_pages / page_size: the page pool (``page_size`` None = the longest factor row); the
            default, :data:`DEFAULT_NUM_PAGES`, holds the benchmark's four adapters and a full batch.
        max_batch_size: most requests decoding together.
        max_prompt_tokens: longer prompts get 413 (None = the model's context).
        blocksize / double_quant: NF4 quantization of the base.
        threads: CPU threads of the server's engine (``torch.set_num_threads``; None =
            :func:`default_server_threads`, one per core less one for the HTTP front end, so 1 on
            a 2-core machine, where a single stream decodes faster on 1 thread than on 2).
        prefix_caching: reuse the KV pages of prompt blocks an earlier request with the same adapter
            started with (the chat template and system prompt); see ``serving/prefix_cache.py``.
    """

    adapters_dir: str
    model: str = "smollm2"
    num_pages: int = DEFAULT_NUM_PAGES
    page_size: int | None = None
    max_batch_size: int = 16
    max_prompt_tokens: int | None = None
    blocksize: int = 64
    double_quant: bool = True
    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_chars: int = 131_072
    max_messages: int = 1024
    max_queue_wait_s: float = 60.0
    threads: int | None = None
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ServerConfigError(f"model={self.model!r} is not servable; choose one of {', '.join(MODELS)}.")
        if not Path(self.adapters_dir).is_dir():
            raise ServerConfigError(f"adapters_dir={self.adapters_dir!r} is not a directory.")
        for name in ("num_pages", "max_batch_size", "blocksize", "max_body_bytes", "max_prompt_chars", "max_messages"):
            _check_positive(name, getattr(self, name))
        for name in ("page_size", "max_prompt_tokens", "threads"):
            _check_positive(name, getattr(self, name), optional=True)
        _check_positive("max_queue_wait_s", self.max_queue_wait_s, kind=float)

    def known_models(self) -> list[str]:
        root = Path(self.adapters_dir)
        return [BASE_MODEL, *sorted(c.name for c in root.iterdir() if c.is_dir() and is_adapter_dir(c))]

    def build_engine(self) -> GenerationEngine:
        from lightning_qlora.models import load_smollm2
        from lightning_qlora.models.tiny import load_tiny_llama
        from lightning_qlora.quantization.convert import quantize_linears

        use_server_threads(self.threads)
        model, tokenizer = load_tiny_llama() if self.model == "tiny" else load_smollm2()
        quantize_linears(model, "nf4", self.blocksize, self.double_quant)
        return GenerationEngine(
            model,
            tokenizer,
            adapters_dir=self.adapters_dir,
            num_pages=self.num_pages,
            page_size=self.page_size,
            max_batch_size=self.max_batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            max_queue_wait_s=self.max_queue_wait_s,
            prefix_caching=self.prefix_caching,
        )


def _error(
    status: int, message: str, kind: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    kind = kind or {404: "model_not_found", 413: "request_too_large"}.get(status, "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status, **extra}}, status_code=status, headers=headers
    )


def _error_of(error: BaseException) -> JSONResponse:
    status, kind, message, headers = http_answer(error)
    return _error(status, message, kind, headers)


def _error_event(event: dict[str, Any]) -> JSONResponse:
    headers = {"Retry-After": str(event["retry_after"])} if event.get("retry_after") else None
    return _error(event["status"] or 500, event["error"], event["error_type"], headers)


def _sampling(body: dict[str, Any]) -> SamplingParams:
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequestError(f"seed={seed!r} must be an integer.")
    if not isinstance(stop, tuple):
        raise InvalidRequestError(f"stop={stop!r} must be a string or a list of strings.")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)


def _prompt_of(kind: str, body: dict[str, Any]) -> Any:
    if kind == "chat":
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise InvalidRequestError("messages must be a non-empty list of {'role': str, 'content': str} objects.")
        return messages
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string.")
    return prompt


class OpenAIAdapterSpec(LitSpec):
    """Routes, validation and OpenAI response shapes (runs in LitServe's API-server process)."""

    def __init__(self, known_models: list[str], config: ServerConfig | None = None) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"
        self.known_models = list(known_models)
        self.created = int(time.time())
        defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
        self.limits = config or types.SimpleNamespace(**defaults)
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/v1/stats", self.stats, ["GET"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": self.created, "owned_by": "lightning_qlora"}
                for name in self.known_models
            ],
        }

    async def stats(self) -> Any:
        """Pool occupancy and adapter residency, read from the worker's engine."""
        uid, responses = self._send({"kind": "stats"})
        first = await anext(responses, None)
        self.response_buffer.pop(uid, None)
        if first is None or first[1] == LitAPIStatus.ERROR:
            return _error(500, "could not read the engine's statistics")
        return json.loads(first[0])

    async def chat_completions(self, request: Request) -> Any:
        return await self._handle("chat", request)

    async def completions(self, request: Request) -> Any:
        return await self._handle("text", request)

    def _send(self, payload: dict[str, Any]) -> tuple[uuid.UUID, AsyncIterator]:
        uid = uuid.uuid4()
        q: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
        return uid, self.data_streamer(q, event, send_status=True)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) past ``max_body_bytes`` before it is parsed -- or even read, when declared."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLargeError(
                f"the request body has {declared} bytes; this server accepts at most {limit} (max_body_bytes)."
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestTooLargeError(f"the request body exceeds {limit} bytes (max_body_bytes).")
        return bytes(body)

    def _check_prompt_size(self, kind: str, prompt: Any) -> None:
        """Refuse (413) a prompt over the character / message limits before anything tokenizes it."""
        if kind == "chat":
            if len(prompt) > self.limits.max_messages:
                raise RequestTooLargeError(
                    f"the request has {len(prompt)} messages; this server accepts at most "
                    f"{self.limits.max_messages} (max_messages)."
                )
            chars = sum(len(m["content"]) + len(m["role"]) for m in prompt)
        else:
            chars = len(prompt)
        if chars > self.limits.max_prompt_chars:
            raise RequestTooLargeError(
                f"the prompt has {chars} characters; this server accepts at most "
                f"{self.limits.max_prompt_chars} (max_prompt_chars)."
            )

    async def _handle(self, kind: str, request: Request) -> Any:
        try:
            raw = await self._read_body(request)
        except RequestTooLargeError as error:
            return _error_of(error)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"the request body is not valid JSON: {error}")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object.")
        model = body.get("model", BASE_MODEL)
        if model not in self.known_models:
            return _error(404, str(UnknownAdapterError(str(model), self.known_models)), known_models=self.known_models)
        try:
            params = _sampling(body)
            prompt = _prompt_of(kind, body)
            self._check_prompt_size(kind, prompt)
        except InvalidRequestError as error:
            return _error_of(error)
        request_id = uuid.uuid4().hex
        payload = {
            "kind": kind,
            "id": request_id,
            "model": model,
            "prompt": prompt,
            "params": params.__dict__,
            "stream": bool(body.get("stream")),
        }
        uid, responses = self._send(payload)
        first = await anext(responses, None)  # errors found by the worker arrive before any token
        if first is not None and first[1] == LitAPIStatus.ERROR:
            self.response_buffer.pop(uid, None)
            error = first[0]
            if isinstance(error, HTTPException):
                return _error(error.status_code, str(error.detail))
            return _error_of(error if isinstance(error, BaseException) else RuntimeError(str(error)))
        if first is not None and json.loads(first[0]).get("error"):
            self.response_buffer.pop(uid, None)
            return _error_event(json.loads(first[0]))
        chunks = self._chunks(first, responses)
        if body.get("stream"):
            return StreamingResponse(self._sse(kind, model, request_id, uid, chunks), media_type="text/event-stream")
        text, last = [], {}
        async for chunk in chunks:
            if chunk.get("error"):
                return _error_event(chunk)
            text.append(chunk["text"])
            last = chunk
        return self._final(kind, model, request_id, "".join(text), last)

    @staticmethod
    async def _chunks(first: Any, responses: AsyncIterator) -> AsyncIterator[dict[str, Any]]:
        pending = first
        while pending is not None:
            data, status = pending
            if status == LitAPIStatus.ERROR:
                raise RuntimeError(f"generation failed: {data}")
            yield json.loads(data)
            pending = await anext(responses, None)

    @staticmethod
    def _final(kind: str, model: str, request_id: str, text: str, last: dict[str, Any]) -> dict[str, Any]:
        usage = {"prompt_tokens": last.get("prompt_tokens", 0), "completion_tokens": last.get("completion_tokens", 0)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.get("finish_reason")}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": f"cmpl-{request_id}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    async def _sse(
        self, kind: str, model: str, request_id: str, uid: uuid.UUID, chunks: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[str]:
        finished = False
        try:
            async for chunk in chunks:
                if chunk.get("error"):
                    finished = True
                    yield f"data: {json.dumps({'error': {'message': chunk['error'], 'type': chunk['error_type'], 'code': chunk['status']}})}\n\n"
                    break
                choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.get("finish_reason")}
                if kind == "chat":
                    choice["delta"] = {"role": "assistant", "content": chunk["text"]}
                else:
                    choice["text"] = chunk["text"]
                message = {
                    "id": f"cmpl-{request_id}",
                    "model": model,
                    "created": int(time.time()),
                    "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "choices": [choice],
                }
                if chunk.get("finish_reason") is not None:
                    finished = True
                    message["usage"] = self._final(kind, model, request_id, "", chunk)["usage"]
                yield f"data: {json.dumps(message)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the stream broke): free the request's pages
                self.response_buffer.pop(uid, None)
                cancel_uid, _ = self._send({"kind": "cancel", "id": request_id})
                self.response_buffer.pop(cancel_uid, None)


class AdapterServingAPI(ls.LitAPI):
    """The inference-worker side: owns the engine and streams its events back."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(spec=OpenAIAdapterSpec(config.known_models(), config), enable_async=True)
        self.config = config
        self.engine: GenerationEngine | None = None
        self.handles: dict[str, RequestHandle] = {}

    def setup(self, device: str) -> None:
        self.engine = self.config.build_engine()
        self.engine.start()

    async def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request

    async def predict(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        engine = self.engine
        if payload["kind"] == "cancel":
            handle = self.handles.get(payload["id"])
            if handle is not None:
                handle.cancel()
            return
        if payload["kind"] == "stats":
            stats = engine.pool.stats()
            yield {
                **dataclasses.asdict(stats),
                "occupancy": stats.occupancy,
                "page_size": engine.pool.page_size,
                "loaded_adapters": engine.registry.loaded(),
                "evictions": len(engine.registry.stats.evicted),
                "adapter_loads": engine.registry.stats.loads,
                "running": len(engine._running),
                "finish_reasons": dict(engine.finish_reasons),
                "prefix_cache": (
                    dataclasses.asdict(engine.prefix_cache.stats) if engine.prefix_cache is not None else None
                ),
            }
            return
        loop = asyncio.get_running_loop()

        def submit() -> RequestHandle:  # off the event loop: a long prompt must not stall other streams
            prompt = payload["prompt"]
            if payload["kind"] == "chat":
                prompt = engine.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            params = SamplingParams(**{**payload["params"], "stop": tuple(payload["params"]["stop"])})
            return engine.submit(prompt, payload["model"], params, loop=loop, stream=payload.get("stream", True))

        try:
            handle = await asyncio.to_thread(submit)
        except Exception as error:  # noqa: BLE001 -- every failure is answered with its typed status
            status, kind, message, headers = http_answer(error)
            yield {
                "error": message,
                "status": status,
                "error_type": kind,
                "retry_after": int(headers["Retry-After"]) if "Retry-After" in headers else None,
            }
            return
        self.handles[payload["id"]] = handle
        # A non-streaming answer is sent once, when it is complete: one message between the worker
        # and the HTTP process per request instead of one per token (measured: ~3 ms per token of
        # a single stream went to those hand-offs on 2 cores); the engine, too, hands it over once.
        stream = payload.get("stream", True)
        text: list[str] = []
        last = None
        try:
            async for event in handle:
                last = event
                if event.finish_reason == "error":
                    yield {
                        "error": event.error,
                        "status": event.status,
                        "error_type": event.error_type,
                        "retry_after": event.retry_after,
                    }
                    return
                text.append(event.text)
                if stream or event.finish_reason is not None:
                    yield {
                        "text": "".join(text),
                        "finish_reason": event.finish_reason,
                        "prompt_tokens": event.prompt_tokens,
                        "completion_tokens": event.completion_tokens,
                    }
                    text.clear()
            if text:  # the handle ended without a final event (cancelled): what was generated
                yield {
                    "text": "".join(text),
                    "finish_reason": None,
                    "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens,
                }
        finally:
            self.handles.pop(payload["id"], None)

    async def encode_response(self, outputs: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        async for output in outputs:
            yield output


class AdapterServer(ls.LitServer):
    """LitServer that binds 127.0.0.1 unless told otherwise (LitServe's own default is every interface)."""

    def run(self, host: str = "127.0.0.1", port: int | str = 8000, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("generate_client_file", False)
        super().run(host=host, port=port, **kwargs)


def build_server(config: ServerConfig, **server_kwargs: Any) -> AdapterServer:
    """A server with the OpenAI-compatible routes (one CPU worker: one engine, one base in memory)."""
    return AdapterServer(
        AdapterServingAPI(config), accelerator="cpu", devices=1, workers_per_device=1, timeout=False, **server_kwargs
    )
