"""The examples run as documented."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quantize_and_share_with_bitsandbytes(capsys):
    runpy.run_path(str(EXAMPLES / "quantize_and_share_with_bitsandbytes.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "bits/param" in out and "max output difference 0.00e+00" in out
