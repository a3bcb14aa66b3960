"""Third-party start-up noise the app's user cannot act on, filtered at the console entry point only.

Called by ``lightning-qlora`` (:mod:`lightning_qlora.cli`) before anything heavy is imported; the
library itself never touches warning filters or other packages' loggers, so a user importing
``lightning_qlora`` in their own program sees everything. Each filter is narrow (one message or one
logger) and says why it is safe to drop.
"""

from __future__ import annotations

import logging
import os
import warnings

#: (message regex, category) of warnings that concern the libraries, not a user of the app
_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's own pytree use against torch 2.13 (a deprecation for Lightning's maintainers)
    (r".*isinstance\(treespec, LeafSpec\)", Warning),
    # QLoRAModule keeps the frozen 4-bit base in eval mode on purpose and turns the rest to train
    # mode in on_train_start, just after Lightning's check
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    # the default run dir is new per run; a resumed run's files are continued by design
    (r".*Experiment logs directory .* exists and is not empty", Warning),
    (r".*Checkpoint directory .* exists and is not empty", Warning),
)

#: loggers of optional accelerators probed at import (torchao's CUDA/triton kernels, torch's pytree
#: deprecation notices torchao triggers): nothing the CPU run uses
_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")

#: Lightning's advertisement line ("Tip: ... litlogger")
_LIGHTNING_TIP = "litlogger"


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_third_party() -> None:
    """Install the app's filters (idempotent). ``LIGHTNING_QLORA_VERBOSE=1`` leaves everything on."""
    if os.environ.get("LIGHTNING_QLORA_VERBOSE", "").lower() in ("1", "true", "yes"):
        return
    # transformers' per-file "Loading weights" bars: the app prints its own messages for the slow steps
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.logger_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(_LIGHTNING_TIP))
