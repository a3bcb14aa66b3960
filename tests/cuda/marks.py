"""The ``cuda`` mark every GPU test carries, skipped (with the reason) where no CUDA device is present.

The oracle on the GPU machine is our CPU kernels (bitsandbytes is not installed there); the
CPU tests pin those bit for bit to bitsandbytes, so equality with them is equality with it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()

#: ``pytestmark = CUDA_ONLY`` in a module makes every test in it a skipped-without-GPU ``cuda`` test.
CUDA_ONLY = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device: run `make gpu-check OUT=dir` on a GPU machine"),
]


def to_device(value: Any, device: torch.device | str = "cuda") -> Any:
    """``value`` with every tensor in it (also inside tuples and lists) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value
