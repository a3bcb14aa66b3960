"""Kernel benchmark; kept as a script for ``python benchmarks/kernel_speed.py``.

Not named ``kernels.py``: a script's directory comes first on ``sys.path``, and that name would
shadow Hugging Face's ``kernels`` package, which transformers imports, for every script here.

The code lives in :mod:`lightning_qlora.bench.kernels` (``python -m lightning_qlora.bench kernels [--contention N]``).
"""

import sys

from lightning_qlora.bench.kernels import main

if __name__ == "__main__":
    main(sys.argv[1:])
