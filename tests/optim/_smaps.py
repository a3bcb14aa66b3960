"""Measure what the kernel really maps of the page files: ``Rss`` of their mappings in /proc/self/smaps."""

from __future__ import annotations

from pathlib import Path

from lightning_qlora.optim.stores.mmap import PAGE_FILE_PREFIX


def page_file_rss_bytes(directory: Path) -> int:
    """Sum of ``Rss`` over this process's mappings of page files in ``directory``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode path"
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) > 5 else ""
                inside = path.startswith(str(directory)) and PAGE_FILE_PREFIX in path
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total
