"""Turning instruction examples into token ids with the tokenizer's chat template.

Training sequence of an example = ``prompt_ids + answer_ids`` where

- ``prompt_ids`` = the template applied to the prompt messages with the assistant
  generation header (exactly what the model is given at evaluation time, see
  :func:`generation_prompt_ids`), and
- ``answer_ids`` = the rest of the template applied to the whole conversation (the answer
  and the template's end-of-turn tokens, e.g. ``<|im_end|>``), so the model learns to stop.

Labels are ``-100`` on the prompt (and on padding, see :func:`pad_batch`): the loss is
on the answer only. The two parts are tokenized separately so the training prompt is
token-for-token the evaluation prompt.

Example (ChatML template, as SmolLM2):
    ``<|im_start|>user\\nDate: ...<|im_end|>\\n<|im_start|>assistant\\n`` -> labels -100,
    ``2021-03-05<|im_end|>\\n`` -> labels = ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_qlora.data.records import ChatTemplateError, InstructionExample
from lightning_qlora.lm_loss import IGNORE_INDEX


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template (a Jinja string) "
            "or use an instruct model's tokenizer."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote any BOS/special tokens into the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generation_prompt_ids(tokenizer: Any, example: InstructionExample) -> list[int]:
    """Token ids of the prompt messages followed by the assistant generation header."""
    return _ids(tokenizer, _render(tokenizer, example.prompt_messages, add_generation_prompt=True))


def encode_example(tokenizer: Any, example: InstructionExample, max_length: int | None = None) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one example (unpadded; labels -100 on the prompt).

    Sequences longer than ``max_length`` are cut on the right (the end of the answer is lost
    first); the caller decides what to do with examples left without any answer token.

    Raises:
        ChatTemplateError: no chat template, or the template renders the prompt differently
            inside the full conversation (then the training prompt would not be the evaluation prompt).
    """
    prompt_text = _render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    full_text = _render(tokenizer, list(example.messages), add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            f"{example.source or 'example'}: the chat template renders the prompt differently once the answer is "
            f"appended, so the answer cannot be separated from the prompt.\n"
            f"prompt: {prompt_text!r}\nfull: {full_text!r}"
        )
    prompt_ids = _ids(tokenizer, prompt_text)
    answer_ids = _ids(tokenizer, full_text[len(prompt_text) :])
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked, so its value does not matter)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise ChatTemplateError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token; set tokenizer.pad_token.")


def pad_batch(
    features: Sequence[dict[str, list[int]]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to the longest one.

    Padding gets ``attention_mask`` 0 and label -100. The mask is built from the lengths,
    never by comparing ids with ``pad_id``: for many chat models the pad token *is* the
    end-of-turn token, which must stay a trained label.

    Args:
        features: dicts with ``input_ids`` and optionally ``labels`` (lists of ints).
        pad_id: id written into padded positions.
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``labels`` if given) as ``(batch, max_len)`` int64 tensors.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'.")
    if not features:
        raise ValueError("cannot pad an empty batch.")
    width = max(len(f["input_ids"]) for f in features)
    with_labels = all("labels" in f for f in features)

    def place(values: list[int], fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + list(values) if padding_side == "left" else list(values) + padding

    batch = {
        "input_ids": torch.tensor([place(f["input_ids"], pad_id) for f in features], dtype=torch.long),
        "attention_mask": torch.tensor([place([1] * len(f["input_ids"]), 0) for f in features], dtype=torch.long),
    }
    if with_labels:
        batch["labels"] = torch.tensor([place(f["labels"], IGNORE_INDEX) for f in features], dtype=torch.long)
    return batch
