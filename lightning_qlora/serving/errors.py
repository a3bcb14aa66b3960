"""Typed errors of the serving stack; each names the offending value and how to fix it.

The HTTP layer maps them to status codes: :class:`UnknownAdapterError` -> 404,
:class:`InvalidRequestError` -> 400/413, :class:`PoolExhaustedError` -> 503.
"""

from __future__ import annotations

from collections.abc import Sequence


class ServingError(RuntimeError):
    """Base class of every serving error."""


class PoolExhaustedError(ServingError):
    """The page pool has fewer free pages than an allocation needs (after evicting what may be evicted)."""


class UnknownAdapterError(ServingError, KeyError):
    """A request names an adapter the registry does not know."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown model/adapter {name!r}; known: {', '.join(self.known) or 'none'}.")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidRequestError(ServingError, ValueError):
    """A generation request is malformed (bad sampling settings, empty or oversized prompt).

    Attributes:
        status: the HTTP status the API answers with (400, or 413 for oversized prompts).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
