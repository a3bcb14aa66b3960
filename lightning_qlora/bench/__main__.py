"""``python -m lightning_qlora.bench <name> [options]``: ``kernels`` (see its ``--help``), or the GPU check (``gpu OUTDIR``)."""

from __future__ import annotations

import sys

from lightning_qlora.bench import kernels

BENCHMARKS = {"kernels": kernels.main}


def main(argv: list[str]) -> None:
    if argv[:1] == ["gpu"]:  # takes its own arguments (see lightning_qlora/bench/gpu.py)
        from lightning_qlora.bench import gpu

        raise SystemExit(gpu.main(argv[1:]))
    if not argv or argv[0] not in BENCHMARKS:
        choices = ",".join(BENCHMARKS)
        raise SystemExit(
            f"usage: python -m lightning_qlora.bench {{{choices}}} [options] | gpu OUTDIR [--dry-run], got {argv}"
        )
    BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
