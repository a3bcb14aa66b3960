"""Sampling settings of a request, next-token choice, and stop-sequence handling for streams."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lightning_qlora.serving.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How a request generates.

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temperature: 0 for greedy decoding, else softmax temperature (<= 2, as OpenAI).
        top_p: nucleus sampling mass in (0, 1].
        stop: strings that end the completion (not included in the output); at most 4.
        seed: seed of the request's own random generator (sampling only); None = random.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens={self.max_tokens!r} must be a positive integer.")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature={self.temperature!r} must be a number in [0, 2] (0 = greedy).")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p={self.top_p!r} must be a number in (0, 1].")
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(f"stop={list(self.stop)!r} must be at most 4 non-empty strings.")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from float32 ``logits (vocab,)``: argmax if greedy, else temperature + top-p sampling."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # mass strictly above each token
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop sequence starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stable_prefix_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be streamed now: not a trailing partial character, nor a suffix
    that could still grow into a stop sequence."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":  # an incomplete multi-byte character so far
        end -= 1
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[end - size : end] == stop[:size]:
                hold = max(hold, size)
                break
    return end - hold
