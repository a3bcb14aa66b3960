"""Give back the resident pages of a float weight read from a memory-mapped checkpoint.

transformers memory-maps safetensors checkpoints (a private, file-backed mapping) and its
parameters point into it. After a layer is quantized its float weight is garbage, but the pages
read from the file stay resident for as long as *any* tensor of the file lives -- the frozen
float embedding keeps SmolLM2's whole 538 MB mapping alive. ``madvise(MADV_DONTNEED)`` on the
weight's pages drops them from the process.

On a private file mapping that advice discards the pages: untouched ones fault back in from the
file, but privately modified ones would revert to the file's bytes. So pages are released only
when nothing can still read them: they lie in a *file-backed* mapping (never anonymous memory,
where the advice zeroes data), no tensor the model still holds overlaps them, and the dropped
weight has no Python referrers besides its old layer. Off Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def file_backed_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's private mappings backed by a regular file (empty off Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    begin = tensor.data_ptr()
    return begin, begin + tensor.numel() * tensor.element_size()


def release_file_backed_pages(
    weight: torch.Tensor, live: Iterable[torch.Tensor], mappings: list[tuple[int, int]]
) -> int:
    """Drop the whole pages of ``weight`` (about to be discarded) if nothing in ``live`` shares them.

    Args:
        weight: the float weight just replaced by its quantized form.
        live: every tensor the model still holds (parameters and buffers); only read when the
            weight lies in a file mapping, so it can be a lazy iterable.
        mappings: :func:`file_backed_mappings`, read once per conversion.

    Returns:
        Bytes released (0 when any condition of the module docstring fails).
    """
    libc = _libc()
    if libc is None or weight.device.type != "cpu" or weight.numel() == 0:
        return 0
    begin, end = _byte_range(weight)
    if not any(start <= begin and end <= stop for start, stop in mappings):
        return 0
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, (end // page) * page  # whole pages only
    if last <= first:
        return 0
    for tensor in live:
        if tensor.device.type != "cpu" or not tensor.numel():
            continue
        try:
            low, high = _byte_range(tensor)
        except RuntimeError:  # a wrapper subclass (a 4-bit weight): fresh memory, not the mapping
            continue
        if low < last and first < high:
            return 0
    if libc.madvise(first, last - first, _MADV_DONTNEED) != 0:
        return 0
    return last - first
