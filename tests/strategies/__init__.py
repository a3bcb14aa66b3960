"""Tests of lightning_qlora.strategies."""
