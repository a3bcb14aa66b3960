"""Instruction data: JSONL records, chat-template encoding, a LightningDataModule, exact-match evaluation.

The task shipped with the package (``tasks/iso_dates``) is generated deterministically by
``python -m lightning_qlora.data.make_dataset``.

Example:
    >>> data = InstructionDataModule(tokenizer, **task_paths("iso_dates"), batch_size=16)
    >>> metrics = evaluate_instruction_model(model, tokenizer, read_instruction_jsonl(data.paths["test"]))
"""

from lightning_qlora.data.chat import IGNORE_INDEX, encode_example, generation_prompt_ids, pad_batch, pad_token_id
from lightning_qlora.data.datamodule import InstructionDataConfigError, InstructionDataModule, encode_examples
from lightning_qlora.data.evaluate import ExactMatch, evaluate_instruction_model, evaluate_loss, generate_answers
from lightning_qlora.data.resume import RandomStateCheckpoint, ResumableDataLoader, SeededShuffleSampler
from lightning_qlora.data.records import (
    ChatTemplateError,
    DatasetNotFoundError,
    InstructionDataError,
    InstructionExample,
    MalformedRecordError,
    read_instruction_jsonl,
    task_paths,
    with_system_prompt,
)

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplateError",
    "DatasetNotFoundError",
    "ExactMatch",
    "InstructionDataConfigError",
    "InstructionDataError",
    "InstructionDataModule",
    "InstructionExample",
    "MalformedRecordError",
    "RandomStateCheckpoint",
    "ResumableDataLoader",
    "SeededShuffleSampler",
    "encode_example",
    "encode_examples",
    "evaluate_instruction_model",
    "evaluate_loss",
    "generate_answers",
    "generation_prompt_ids",
    "pad_batch",
    "pad_token_id",
    "read_instruction_jsonl",
    "task_paths",
    "with_system_prompt",
]
