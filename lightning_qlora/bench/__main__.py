"""``python -m lightning_qlora.bench <name>``: run one benchmark (``kernels``)."""

from __future__ import annotations

import sys

from lightning_qlora.bench import kernels

BENCHMARKS = {"kernels": kernels.main}


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: python -m lightning_qlora.bench {{{','.join(BENCHMARKS)}}}, got {argv}")
    BENCHMARKS[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
