"""Fixtures of the data tests (see :mod:`tests.data.helpers`)."""

from __future__ import annotations

import pytest

from .helpers import make_char_tokenizer


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()
