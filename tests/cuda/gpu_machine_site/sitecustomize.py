"""Makes this Python look like the GPU machine's: the packages it lacks cannot be imported or found.

Put this folder first on ``PYTHONPATH`` and every Python process started with that environment
(the GPU check and the pytest it runs) imports this file at start-up. A blocked module is set to
``None`` in ``sys.modules`` (``import`` raises ``ModuleNotFoundError``, ``importlib.util.find_spec``
returns ``None``) and its distribution is hidden from ``importlib.metadata`` (Lightning and
torchmetrics probe availability through package metadata before importing).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

#: Import names absent on the GPU machine (it has torch, lightning, transformers, peft, safetensors,
#: torchmetrics, pytest, ninja and nvcc).
BLOCKED_MODULES = (
    "hydra",
    "hydra_plugins",
    "omegaconf",
    "wandb",
    "litserve",
    "bitsandbytes",
    "gguf",
    "hypothesis",
    "matplotlib",
    "rich",
    "torchao",
    "tensorboard",
    "tensorboardX",
    "optuna",
    "submitit",
)
#: Their distribution names, normalized as PEP 503 does.
BLOCKED_DISTRIBUTIONS = frozenset(
    {
        "hydra-core",
        "hydra-optuna-sweeper",
        "hydra-submitit-launcher",
        "omegaconf",
        "wandb",
        "litserve",
        "bitsandbytes",
        "gguf",
        "hypothesis",
        "matplotlib",
        "rich",
        "torchao",
        "tensorboard",
        "tensorboardx",
        "optuna",
        "submitit",
    }
)


def _normalized(name: str | None) -> str:
    return re.sub(r"[-_.]+", "-", name or "").lower()


for _module in BLOCKED_MODULES:
    sys.modules[_module] = None  # type: ignore[assignment]

_discover = importlib.metadata.Distribution.discover.__func__  # type: ignore[attr-defined]


def _visible(cls: type, **kwargs: object) -> object:
    return (d for d in _discover(cls, **kwargs) if _normalized(d.metadata["Name"]) not in BLOCKED_DISTRIBUTIONS)


importlib.metadata.Distribution.discover = classmethod(_visible)  # type: ignore[method-assign,assignment]
