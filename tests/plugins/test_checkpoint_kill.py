"""SIGKILL during a checkpoint write never leaves a checkpoint that loads as valid but wrong.

The writer process is paused halfway through writing the bytes (its file write is wrapped),
so the kill lands mid-write every time, not by timing luck.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    import fsspec.implementations.local as local
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning_qlora.quantization import Linear4bit

    original = local.LocalFileOpener.write
    def write_half_then_stall(self, data, *args, **kwargs):
        view = memoryview(data)
        original(self, view[: len(view) // 2])
        self.flush()
        print("writing", flush=True)
        time.sleep(60)
        return original(self, view[len(view) // 2 :])
    local.LocalFileOpener.write = write_half_then_stall

    layer = Linear4bit.from_linear(torch.nn.Linear(1024, 1024))
    state = {"state_dict": layer.state_dict(), "filler": torch.arange(1_000_000, dtype=torch.float32)}
    path = sys.argv[1]
    if sys.argv[2] == "overwrite":  # an older, complete checkpoint is already there
        torch.save({"old": torch.ones(3)}, path)
    TorchCheckpointIO().save_checkpoint(state, path)
    print("done", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("existing", ["fresh", "overwrite"])
def test_checkpoint_killed_mid_write_is_absent_or_the_old_one(tmp_path, existing):
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path), existing], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    assert line == "writing", f"writer did not pause mid-write (got {line!r})"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if existing == "fresh":
        assert not path.exists()
    else:  # the previous checkpoint is intact, never a half-written new one
        assert torch.equal(torch.load(path, weights_only=True)["old"], torch.ones(3))
    assert not [p.name for p in tmp_path.iterdir() if p != path and p.suffix == ".ckpt"]
