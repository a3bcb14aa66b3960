"""Tests of lightning_qlora.optim."""
