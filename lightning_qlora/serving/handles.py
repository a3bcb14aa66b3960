"""The caller's side of a request: the events it streams and the handle that yields them."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from lightning_qlora.serving.errors import http_answer


@dataclass
class GenerationEvent:
    """A piece of a stream: new ``text`` (may be empty), and on the last event ``finish_reason``
    (``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``) with token counts.

    An ``"error"`` event also carries the HTTP answer of its cause (see :mod:`.errors`): ``status``,
    ``error_type``, the ``error`` message and, for a full pool, ``retry_after`` seconds.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int | None = None
    error_type: str | None = None
    retry_after: int | None = None

    @classmethod
    def failure(cls, error: BaseException, prompt_tokens: int = 0, completion_tokens: int = 0) -> GenerationEvent:
        """The last event of a request that failed with ``error``."""
        status, kind, message, headers = http_answer(error)
        retry = int(headers["Retry-After"]) if "Retry-After" in headers else None
        return cls("", "error", prompt_tokens, completion_tokens, message, status, kind, retry)


class RequestHandle:
    """The caller's side of one request: iterate (or ``async for``) its events; ``cancel()`` frees it.

    ``stream=False``: the text is kept here until the request ends and arrives in its last event
    alone. Each event handed to an event loop wakes it and takes the GIL from the engine's thread
    (which holds it between kernels): measured on 2 cores, a non-streaming single stream decoded
    ~20% slower over HTTP than in-process with one hand-off per token.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None, stream: bool = True) -> None:
        self.id = request_id
        self._loop = loop
        self._queue: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self._stream = stream
        self._held: list[str] = []
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def _put(self, event: GenerationEvent) -> None:
        if not self._stream:
            if event.finish_reason is None:
                self._held.append(event.text)
                return
            event = dataclasses.replace(event, text="".join(self._held) + event.text)
            self._held.clear()
        if event.finish_reason is not None:
            self.done.set()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                self.cancelled.set()
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
