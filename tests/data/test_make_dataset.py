"""The shipped iso_dates data is exactly what the deterministic generator writes, and is correct."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from lightning_qlora.data import make_dataset
from lightning_qlora.data.make_dataset import (
    DEFAULT_SIZES,
    DatasetGenerationError,
    ISO_DATES_INSTRUCTION,
    generate,
    main,
    stale_files,
)
from lightning_qlora.data.records import TASKS_DIR

_FORMATS = ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%A, %B %d, %Y")


def _parse_written_date(text: str) -> datetime.date:
    """Read a prompt's date back with the standard library (independent of the generator's code)."""
    text = re.sub(r"^the (\d+)(st|nd|rd|th) of (\w+), ", r"\1 \3 ", text)  # "the 5th of March, 2021"
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", text)
    for fmt in _FORMATS:
        try:
            date = datetime.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        if "%A" in fmt:  # strptime does not check the weekday against the date
            assert text.split(",")[0] == date.strftime("%A"), text
        return date
    raise AssertionError(f"unparseable date {text!r}")


def _records(content: bytes) -> list[dict[str, str]]:
    return [json.loads(line) for line in content.decode("utf-8").splitlines()]


def test_same_bytes_twice_and_seed_matters():
    first, second = generate(), generate()
    assert first == second
    assert generate(seed=make_dataset.DEFAULT_SEED + 1)["test"] != first["test"]


def test_cli_writes_identical_files_twice(tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["--out", str(out_a), "--train", "30", "--val", "5", "--test", "7"]) == 0
    assert main(["--out", str(out_b), "--train", "30", "--val", "5", "--test", "7"]) == 0
    for split, count in (("train", 30), ("val", 5), ("test", 7)):
        content = (out_a / f"{split}.jsonl").read_bytes()
        assert content == (out_b / f"{split}.jsonl").read_bytes()
        assert content.count(b"\n") == count


def test_committed_files_are_the_generator_output():
    assert stale_files(TASKS_DIR / "iso_dates", generate()) == [], "run python -m lightning_qlora.data.make_dataset"


def test_check_flag_detects_an_edited_file(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--train", "10", "--val", "2", "--test", "3"]) == 0
    assert main(["--out", str(tmp_path), "--train", "10", "--val", "2", "--test", "3", "--check"]) == 0
    (tmp_path / "val.jsonl").write_text('{"prompt": "x", "response": "y"}\n')
    assert main(["--out", str(tmp_path), "--train", "10", "--val", "2", "--test", "3", "--check"]) == 1
    assert "val.jsonl" in capsys.readouterr().out


def test_answers_are_the_iso_form_of_the_prompt_date_and_splits_share_no_date():
    files = generate()
    dates_per_split = {}
    for split, content in files.items():
        records = _records(content)
        assert len(records) == DEFAULT_SIZES[split]
        dates = set()
        for record in records:
            assert list(record) == ["prompt", "response"]
            instruction, written = record["prompt"].split("\nDate: ")
            assert instruction == ISO_DATES_INSTRUCTION
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["response"])
            assert _parse_written_date(written).isoformat() == record["response"], record
            dates.add(record["response"])
        assert len(dates) == len(records)  # no duplicate within a split
        dates_per_split[split] = dates
    assert not dates_per_split["train"] & dates_per_split["test"]
    assert not dates_per_split["train"] & dates_per_split["val"]
    assert not dates_per_split["val"] & dates_per_split["test"]


def test_all_seven_styles_occur_in_test():
    prompts = [r["prompt"] for r in _records(generate()["test"])]
    assert any(" of " in p for p in prompts) and any("day, " in p for p in prompts)
    assert any(re.search(r"Date: [A-Z][a-z]{2} \d", p) for p in prompts)  # "Mar 5, 2021"
    assert any(re.search(r"Date: \d+(st|nd|rd|th) ", p) for p in prompts)


def test_bad_arguments_are_refused():
    with pytest.raises(DatasetGenerationError, match="unknown task 'nope'"):
        generate("nope")
    with pytest.raises(DatasetGenerationError, match="split size"):
        generate(sizes={"dev": 3})
    with pytest.raises(DatasetGenerationError, match="distinct dates"):
        generate(sizes={"train": 10**6})
