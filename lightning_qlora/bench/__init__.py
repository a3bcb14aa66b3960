"""Benchmarks runnable from an installed package: ``python -m lightning_qlora.bench kernels``."""
