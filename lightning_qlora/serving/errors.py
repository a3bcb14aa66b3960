"""Typed errors of the serving stack; each names the offending value and how to fix it.

Every serving error carries the HTTP answer it maps to (``status``, OpenAI-style ``error_type``),
so the engine, the API worker and the HTTP front end agree on one table:

==========================  ======  =====================  =====================================================
error                       status  ``type``               when
==========================  ======  =====================  =====================================================
:class:`InvalidRequestError`  400   invalid_request_error  malformed body or fields (bad JSON, ``max_tokens=-5``)
:class:`UnknownAdapterError`  404   model_not_found        ``model`` names no adapter of the server
:class:`RequestTooLargeError` 413   request_too_large      body bytes, prompt characters or tokens over a limit
:class:`AdapterFormatError`   422   adapter_invalid        the adapter's files cannot be served (shapes, rank, ...)
:class:`PoolExhaustedError`   503   server_busy            no room in the page pool within the wait (Retry-After)
anything else                 500   internal_error         a bug: the message names the exception
==========================  ======  =====================  =====================================================

A bad adapter is 422, not 5xx: retrying cannot help (clients such as ``openai`` retry 5xx), the
operator must fix the files. A full pool is 503 with ``Retry-After`` because retrying does help.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_qlora.errors import ConfigError, FileFormatError, InputError, LightningQLoRAError, ResourceError


class ServingError(LightningQLoRAError):
    """Base class of every serving error; ``status`` / ``error_type`` are its HTTP answer."""

    status: int = 500
    error_type: str = "internal_error"


class ServerConfigError(ServingError, ConfigError):
    """A server or engine argument is invalid (raised at startup, before anything is loaded)."""


class UnsupportedModelError(ServingError, ConfigError):
    """The base model's architecture is not one the paged engine runs."""


class PoolExhaustedError(ServingError, ResourceError):
    """The page pool has fewer free pages than an allocation needs (after evicting what may be evicted).

    Attributes:
        retry_after: seconds after which a retry is likely to be admitted (the ``Retry-After`` header).
    """

    status = 503
    error_type = "server_busy"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class UnknownAdapterError(ServingError, InputError, KeyError):
    """A request names an adapter the registry does not know."""

    status = 404
    error_type = "model_not_found"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown model/adapter {name!r}; known: {', '.join(self.known) or 'none'}.")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidRequestError(ServingError, InputError):
    """A generation request is malformed (bad sampling settings, empty or oversized prompt).

    Attributes:
        status: the HTTP status the API answers with (400, or 413 for oversized prompts).
    """

    error_type = "invalid_request_error"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        if status == 413:
            self.error_type = RequestTooLargeError.error_type


class RequestTooLargeError(InvalidRequestError):
    """The request body, the prompt's characters or its tokens exceed a configured limit (413)."""

    error_type = "request_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(message, status=413)


class AdapterFormatError(ServingError, FileFormatError):
    """An adapter cannot be served: unreadable files, or factors that do not fit the base model.

    The message names the adapter (its directory) and what is wrong; only requests for this
    adapter fail with it (422), every other request is served.
    """

    status = 422
    error_type = "adapter_invalid"


def http_answer(error: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """``(status, type, message, headers)`` of the HTTP error response for ``error`` (see the module table)."""
    if isinstance(error, ServingError):
        headers = {"Retry-After": str(error.retry_after)} if isinstance(error, PoolExhaustedError) else {}
        return error.status, error.error_type, str(error), headers
    return 500, "internal_error", f"internal error while generating: {type(error).__name__}: {error}", {}
