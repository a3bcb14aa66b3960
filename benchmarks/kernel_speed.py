"""Kernel benchmark; kept as a script for ``python benchmarks/kernels.py``.

The code lives in :mod:`lightning_qlora.bench.kernels` (``python -m lightning_qlora.bench kernels [--contention N]``).
"""

import sys

from lightning_qlora.bench.kernels import main

if __name__ == "__main__":
    main(sys.argv[1:])
