"""The CUDA test set (``pytest -m cuda``): skipped without a GPU, run on one by ``make gpu-check``."""
