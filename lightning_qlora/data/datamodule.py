"""``InstructionDataModule``: JSONL instruction data -> padded causal-LM batches for ``QLoRAModule``.

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``(batch, length)``
int64, padded on the right to the longest sequence of the batch; labels -100 on the prompt
and the padding), which is what :class:`~lightning_qlora.module.QLoRAModule` consumes.

Example:
    >>> from lightning_qlora.data import InstructionDataModule, task_paths
    >>> data = InstructionDataModule(tokenizer, **task_paths("iso_dates"), batch_size=16, max_length=128)
    >>> trainer.fit(QLoRAModule(model), datamodule=data)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_qlora.data.chat import IGNORE_INDEX, encode_example, pad_batch, pad_token_id
from lightning_qlora.data.records import InstructionDataError, InstructionExample, read_instruction_jsonl
from lightning_qlora.data.resume import ResumableDataLoader, SeededShuffleSampler

log = logging.getLogger(__name__)

DataPaths = str | Path | Sequence[str | Path] | None


class InstructionDataConfigError(InstructionDataError):
    """An ``InstructionDataModule`` argument is invalid, or a split that was not configured is used."""


def encode_examples(
    tokenizer: Any, examples: Sequence[InstructionExample], max_length: int | None, name: str = "data"
) -> list[dict[str, list[int]]]:
    """Encode examples for training; drop (with a warning) those truncated to no answer token at all.

    Raises:
        InstructionDataConfigError: every example was dropped (no prompt is shorter than ``max_length``).
    """
    return [encoded for _, encoded in encode_examples_with_indices(tokenizer, examples, max_length, name)]


def encode_examples_with_indices(
    tokenizer: Any, examples: Sequence[InstructionExample], max_length: int | None, name: str = "data"
) -> list[tuple[int, dict[str, list[int]]]]:
    """:func:`encode_examples`, each kept encoding with the index of its example in ``examples``."""
    encoded = [encode_example(tokenizer, example, max_length) for example in examples]
    kept = [(i, e) for i, e in enumerate(encoded) if any(label != IGNORE_INDEX for label in e["labels"])]
    if examples and not kept:
        raise InstructionDataConfigError(
            f"{name}: max_length={max_length} leaves no answer token in any of the {len(examples)} examples; "
            "every prompt (with the chat template) is at least that long. Raise max_length."
        )
    if len(kept) < len(encoded):
        log.warning(
            "%s: dropped %d of %d examples whose answer was truncated away by max_length=%s",
            name,
            len(encoded) - len(kept),
            len(encoded),
            max_length,
        )
    return kept


class InstructionDataModule(L.LightningDataModule):
    """Instruction fine-tuning data from local JSONL files (see :mod:`lightning_qlora.data.records`).

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        train_path: JSONL file(s) for ``fit``.
        val_path: JSONL file(s) for validation (optional).
        test_path: JSONL file(s) for ``test``.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        max_length: sequences are cut to this many tokens (``None``: no limit).
        system_prompt: system message put first in examples without one (``None``: the chat
            template's default; ``""``: an empty one, which saves SmolLM2's 20-token default).
        num_workers: DataLoader worker processes.
        seed: seed of the training shuffle: epoch ``e``'s order is a function of ``(seed, e)`` only, and
            the training loader saves its position in checkpoints, so a run resumed at any step sees
            the batches the uninterrupted run would have (see :mod:`lightning_qlora.data.resume`).

    Raises:
        InstructionDataConfigError: no path at all, a non-positive size, or a dataloader of a split without path.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_path: DataPaths = None,
        val_path: DataPaths = None,
        test_path: DataPaths = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int | None = 256,
        system_prompt: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if train_path is None and val_path is None and test_path is None:
            raise InstructionDataConfigError(
                "InstructionDataModule needs at least one of train_path, val_path, test_path."
            )
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "max_length": max_length}
        for name, value in sizes.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InstructionDataConfigError(f"{name}={value!r} must be a positive integer.")
        self.tokenizer = tokenizer
        self.paths: dict[str, DataPaths] = {"train": train_path, "val": val_path, "test": test_path}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.num_workers = num_workers
        self.seed = seed
        self.pad_id = pad_token_id(tokenizer)
        self.examples: dict[str, list[InstructionExample]] = {}
        self.encoded: dict[str, list[dict[str, list[int]]]] = {}

    @override
    def setup(self, stage: str) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}[stage]
        for split in wanted:
            if self.paths[split] is not None and split not in self.encoded:
                paths = self.paths[split]
                self.examples[split] = read_instruction_jsonl(paths, self.system_prompt)  # type: ignore[arg-type]
                self.encoded[split] = encode_examples(self.tokenizer, self.examples[split], self.max_length, split)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if self.paths[split] is None:
            raise InstructionDataConfigError(
                f"no {split}_path was given to InstructionDataModule; set it to use {split} data."
            )
        if split not in self.encoded:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        collate = partial(pad_batch, pad_id=self.pad_id, padding_side="right")
        dataset = self.encoded[split]
        if shuffle:
            sampler = SeededShuffleSampler(len(dataset), seed=self.seed)
            return ResumableDataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,  # type: ignore[arg-type]
                collate_fn=collate,
                num_workers=self.num_workers,
            )
        # an own generator: creating the iterator draws the workers' base seed, never from the global RNG
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list[Any]:
        # Lightning skips validation when this is empty; a missing val split is not an error.
        return self._loader("val", self.eval_batch_size, shuffle=False) if self.paths["val"] is not None else []

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
