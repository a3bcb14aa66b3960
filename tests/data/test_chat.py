"""Chat-template encoding: labels only on the answer (hand-computed), truncation, padding."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.data import (
    IGNORE_INDEX,
    ChatTemplateError,
    InstructionExample,
    encode_example,
    generation_prompt_ids,
    pad_batch,
    pad_token_id,
)

from .helpers import make_char_tokenizer

START, END = 0, 1  # ids of <|im_start|> and <|im_end|> in the character tokenizer


def chars(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


def test_labels_cover_exactly_the_answer_and_its_end_of_turn(char_tokenizer):
    tok = char_tokenizer
    ids = encode_example(tok, InstructionExample.from_prompt("ab", "c"))
    # <|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n | c<|im_end|>\n
    prompt = [START, *chars(tok, "user\nab"), END, *chars(tok, "\n"), START, *chars(tok, "assistant\n")]
    answer = [*chars(tok, "c"), END, *chars(tok, "\n")]
    assert len(prompt) == 21  # 1 + 7 + 1 + 1 + 1 + 10
    assert ids["input_ids"] == prompt + answer
    assert ids["labels"] == [IGNORE_INDEX] * 21 + answer
    assert generation_prompt_ids(tok, InstructionExample.from_prompt("ab", "c")) == prompt


def test_system_and_multi_turn_prompts_are_masked(char_tokenizer):
    tok = char_tokenizer
    example = InstructionExample(
        (
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "v"},
            {"role": "assistant", "content": "yz"},
        )
    )
    ids = encode_example(tok, example)
    supervised = [t for t, label in zip(ids["input_ids"], ids["labels"]) if label != IGNORE_INDEX]
    assert supervised == [*chars(tok, "yz"), END, *chars(tok, "\n")]  # only the last answer is trained
    assert ids["labels"][-4:] == supervised


def test_max_length_cuts_on_the_right(char_tokenizer):
    example = InstructionExample.from_prompt("ab", "cdef")
    full = encode_example(char_tokenizer, example)
    cut = encode_example(char_tokenizer, example, max_length=23)
    assert cut["input_ids"] == full["input_ids"][:23] and cut["labels"] == full["labels"][:23]
    assert cut["labels"][21:] == chars(char_tokenizer, "cd")
    assert all(label == IGNORE_INDEX for label in encode_example(char_tokenizer, example, max_length=21)["labels"])


def test_right_padding_masks_padding_but_keeps_the_eos_label():
    # pad id == EOS id (1), as in SmolLM2: the answer's EOS must keep its label
    features = [{"input_ids": [5, 6, 1], "labels": [-100, 6, 1]}, {"input_ids": [7], "labels": [7]}]
    batch = pad_batch(features, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [7, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 1], [7, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_padding_for_generation():
    batch = pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0, padding_side="left")
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side='middle'"):
        pad_batch([{"input_ids": [1]}], 0, padding_side="middle")
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], 0)


def test_tokenizer_without_template_or_pad_is_refused():
    tok = make_char_tokenizer(chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        encode_example(tok, InstructionExample.from_prompt("a", "b"))

    class NoSpecialTokens:
        pad_token_id = eos_token_id = None

    with pytest.raises(ChatTemplateError, match="neither a pad nor an EOS"):
        pad_token_id(NoSpecialTokens())


def test_template_that_rewrites_the_prompt_is_refused():
    # a template that prints the turn count first: the prompt alone and the full chat differ
    tok = make_char_tokenizer(
        chat_template="{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="renders the prompt differently"):
        encode_example(tok, InstructionExample.from_prompt("a", "b", source="f.jsonl:4"))
