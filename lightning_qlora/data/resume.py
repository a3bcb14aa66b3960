"""Exact resume at any step: a data order that is a function of (seed, epoch), a loader that saves
its position, and a callback that carries the random-number generators across a checkpoint.

Lightning saves the state of every training loader that has ``state_dict``/``load_state_dict``
in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives it back before the
first batch of the resumed run; it also calls the sampler's ``set_epoch`` at each epoch start.
So 4 steps + resume to 6 sees the same batches, in the same order, as 6 steps in one go -- and,
with :class:`RandomStateCheckpoint`, the same dropout masks -- and the adapters come out bit-identical.

Example:
    >>> loader = ResumableDataLoader(dataset, batch_size=8, sampler=SeededShuffleSampler(len(dataset), seed=0))
    >>> trainer = L.Trainer(callbacks=[RandomStateCheckpoint()], ...)
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from lightning_qlora.data.records import InstructionDataError


class SeededShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_samples)`` drawn from ``seed + epoch`` (as ``DistributedSampler`` does).

    The order depends on nothing else (not on the global RNG, not on how many epochs this object
    has seen), so a resumed run re-creates it from the epoch number alone.

    Args:
        num_samples: dataset length.
        seed: base seed of the shuffle.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (Lightning calls this at each epoch start)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict()`` is its position: ``{"epoch": e, "batches": k}``.

    ``k`` counts the batches of epoch ``e`` handed out (Lightning does not prefetch from a loader
    with a length, so that is the number trained on); ``load_state_dict`` selects epoch ``e``'s order
    and the next ``iter()`` starts at batch ``k`` (the ``k`` skipped batches are read and dropped,
    which is cheap for in-memory token lists). A pass run to its end advances the sampler to the
    next epoch, so a plain ``for`` loop over epochs sees a new order each time.

    Takes every ``DataLoader`` argument; the epoch is that of ``sampler`` (or ``batch_sampler.sampler``)
    when it has ``set_epoch``/``epoch``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the workers' base seed comes from this generator, not from (and never advancing) the global RNG
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self._batches = 0  # batches of the current pass handed out
        self._skip = 0  # batches to drop at the start of the next pass (a restored position)
        self._epoch = 0  # used when the sampler has no epoch of its own

    def _epoch_sampler(self) -> Any:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if callable(getattr(sampler, "set_epoch", None)) and hasattr(sampler, "epoch"):
                return sampler
        return None

    @property
    def epoch(self) -> int:
        """The epoch whose order the current (or next) pass uses."""
        sampler = self._epoch_sampler()
        return int(sampler.epoch) if sampler is not None else self._epoch

    def _set_epoch(self, epoch: int) -> None:
        sampler = self._epoch_sampler()
        if sampler is not None:
            sampler.set_epoch(epoch)
        self._epoch = epoch

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        self._batches = skip
        return self._counted(iterator)

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches += 1  # counted before the step runs: a checkpoint after it includes this batch
            yield batch
        self._batches = 0
        self._set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``; a pass whose every batch was handed out points at the next epoch."""
        if self._batches >= len(self):
            return {"epoch": self.epoch + 1, "batches": 0}
        return {"epoch": self.epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at ``state_dict``'s position: the next ``iter()`` starts there.

        Raises:
            InstructionDataConfigError: the position is past this loader's length (the data or the
                batch size changed since the checkpoint).
        """
        from lightning_qlora.data.datamodule import InstructionDataConfigError

        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if not 0 <= batches <= len(self):
            raise InstructionDataConfigError(
                f"the checkpoint's data position batches={batches} is outside this loader's {len(self)} batches "
                "per epoch: resume with the data files and batch_size the checkpoint was trained with."
            )
        if batches == len(self):  # every batch of epoch `epoch` was trained on: the next pass is the next epoch
            epoch, batches = epoch + 1, 0
        self._set_epoch(epoch)
        self._skip = batches


def _collect_random_states() -> dict[str, Any]:
    # plain tensors, lists and numbers only: checkpoints load with torch.load(weights_only=True)
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(L.Callback):
    """Saves the torch / NumPy / Python (and CUDA) random states in each checkpoint and restores them.

    Dropout (the adapters' included) draws from the global generators; without this a resumed run
    draws other masks than the run it continues. The states are put back just before the first
    training batch of the resumed run -- after model setup, which may draw random numbers of its own
    (adapter initialization) that the checkpoint's weights then overwrite.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return _collect_random_states()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            _restore_random_states(self._pending)
            self._pending = None
