"""JSONL reading: both record layouts, and errors that name the file and line."""

from __future__ import annotations

import pytest

from lightning_qlora.data import (
    DatasetNotFoundError,
    InstructionExample,
    MalformedRecordError,
    read_instruction_jsonl,
    task_paths,
    with_system_prompt,
)

from .helpers import write_jsonl


def test_prompt_response_and_chat_records(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            '{"prompt": "p1", "response": "r1"}',
            "",
            '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},'
            ' {"role": "assistant", "content": "a"}]}',
        ],
    )
    first, second = read_instruction_jsonl(path)
    assert first.messages == ({"role": "user", "content": "p1"}, {"role": "assistant", "content": "r1"})
    assert first.prompt_messages == [{"role": "user", "content": "p1"}] and first.reference == "r1"
    assert first.source == f"{path}:1" and second.source == f"{path}:3"
    assert [m["role"] for m in second.prompt_messages] == ["system", "user"] and second.reference == "a"


def test_several_files_are_concatenated_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ['{"prompt": "1", "response": "x"}'])
    b = write_jsonl(tmp_path / "b.jsonl", ['{"prompt": "2", "response": "y"}', '{"prompt": "3", "response": "z"}'])
    assert [e.reference for e in read_instruction_jsonl([a, b])] == ["x", "y", "z"]


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DatasetNotFoundError, match="nowhere/train.jsonl' does not exist"):
        read_instruction_jsonl(missing)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic handlers
        read_instruction_jsonl(str(missing))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "response": ', "invalid JSON"),
        ('["prompt", "response"]', "expected a JSON object, got list"),
        ('{"prompt": "p", "answer": "a"}', r"got keys \['answer', 'prompt'\]"),
        ('{"prompt": "p", "response": 3}', "expected"),
        ('{"messages": [{"role": "user", "content": "u"}]}', "at least two messages"),
        ('{"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]}', r"messages\[1\]"),
        ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}', "last message"),
    ],
)
def test_malformed_line_names_file_and_line_number(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok", "response": "ok"}', "", line])
    with pytest.raises(MalformedRecordError, match=message) as caught:
        read_instruction_jsonl(path)
    assert f"{path}:3:" in str(caught.value)


def test_system_prompt_is_added_only_where_missing(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            '{"prompt": "p", "response": "r"}',
            '{"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "u"},'
            ' {"role": "assistant", "content": "a"}]}',
        ],
    )
    plain, chat = read_instruction_jsonl(path, system_prompt="")
    assert plain.messages[0] == {"role": "system", "content": ""} and len(plain.messages) == 3
    assert chat.messages[0] == {"role": "system", "content": "own"} and len(chat.messages) == 3
    example = InstructionExample.from_prompt("p", "r")
    assert with_system_prompt(example, None) is example


def test_shipped_task_paths():
    paths = task_paths("iso_dates")
    assert sorted(paths) == ["test_path", "train_path", "val_path"]
    assert all(p.is_file() for p in paths.values())
    with pytest.raises(DatasetNotFoundError, match="task 'nope' is not shipped.*iso_dates"):
        task_paths("nope")
