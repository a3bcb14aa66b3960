"""``AtomicCheckpointIO``: Lightning checkpoints that are never half written, whatever ``$TMPDIR`` is.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` writes through an fsspec
transaction: the bytes go to a temporary file in ``$TMPDIR`` and are then moved onto the
checkpoint path. When ``$TMPDIR`` is on another filesystem (tmpfs is common) that move is a
copy followed by a delete, so a kill during it leaves a truncated ``last.ckpt`` -- the previous
checkpoint already overwritten -- and a half-written temporary in ``$TMPDIR``.

This plugin streams ``torch.save`` into a temporary in the checkpoint's *own* directory,
fsyncs it and renames it over the target (:func:`lightning_qlora.atomic.atomic_torch_save`),
so the checkpoint path always holds the complete previous or the complete new checkpoint and
``$TMPDIR`` is never touched. It also skips Lightning's in-memory copy of the whole checkpoint.
Remote paths (``s3://``...) keep Lightning's behaviour: an object store's upload is atomic.

Our strategies (``paged``, ``paged_ddp``, ``qlora_fsdp``) use it by default, and the Hydra app
installs it in place of the stock ``TorchCheckpointIO`` of any strategy. With a stock Trainer::

    Trainer(plugins=[NF4Precision(), AtomicCheckpointIO()])
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_qlora.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are a same-directory temporary + fsync + ``os.replace``."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            # storage_options: the parent raises its TypeError; remote: fsspec's upload is atomic already
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` where it would use the stock ``TorchCheckpointIO``.

    A checkpoint IO the user chose (any other class, or a subclass) is left alone, and a wrapping
    IO (``AsyncCheckpointIO``) gets ours as its inner IO only where it has none of its own yet.
    """
    current = getattr(strategy, "_checkpoint_io", None)
    inner = getattr(current, "checkpoint_io", None) if current is not None else None
    if current is None or type(current) is TorchCheckpointIO:
        strategy._checkpoint_io = AtomicCheckpointIO()  # the attribute Lightning's own property fills
    elif hasattr(current, "checkpoint_io") and (inner is None or type(inner) is TorchCheckpointIO):
        current.checkpoint_io = AtomicCheckpointIO()


class AtomicCheckpointIODefault:
    """Strategy mixin (first in the bases): :class:`AtomicCheckpointIO` unless the user chose another IO.

    It overrides Lightning's ``Strategy.checkpoint_io`` property rather than passing
    ``checkpoint_io=`` to the constructor, because Lightning refuses a strategy whose constructor
    set one when the user also passes a ``CheckpointIO`` plugin.
    """

    _checkpoint_io: CheckpointIO | None

    @property
    def checkpoint_io(self) -> CheckpointIO:
        install_atomic_checkpoint_io(self)
        return super().checkpoint_io  # type: ignore[misc]

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io
