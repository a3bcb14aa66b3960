"""A Hydra sweep over adapter methods and ranks, then a table of the results.

Runs ``lightning-qlora -m experiment=smoke adapter=lora,dora,vera adapter.r=4,8`` (6 jobs on the
tiny in-memory model, about a minute) and reads each job's ``results.json``. For a real sweep
drop ``experiment=smoke``; for Optuna add ``hparams_search=optuna``; for SLURM
``launcher=submitit_slurm``.

Run: ``python examples/sweep.py [sweep_dir]``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(sweep_dir: str | None = None) -> None:
    sweep_dir = Path(sweep_dir or tempfile.mkdtemp(prefix="sweep_"))
    command = [
        sys.executable,
        "-m",
        "lightning_qlora.train",
        "-m",
        "experiment=smoke",
        "adapter=lora,dora,vera",
        "adapter.r=4,8",
        "evaluate.before=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    subprocess.run(command, check=True)
    print(f"{'job':<5} {'method':<6} {'r':>3} {'exact match':>12} {'answer loss':>12} {'trainable':>10}")
    for results_file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)):
        results = json.loads(results_file.read_text())
        overrides = (results_file.parent / ".hydra" / "overrides.yaml").read_text()
        method = next(
            line.split("=")[1] for line in overrides.splitlines() if "adapter=" in line and "adapter.r" not in line
        )
        rank = next(line.split("=")[1] for line in overrides.splitlines() if "adapter.r=" in line)
        after = results["after"]
        print(
            f"{results_file.parent.name:<5} {method.strip():<6} {rank.strip():>3} {after['exact_match']:>12.3f} "
            f"{after['loss']:>12.4f} {results['trainable_params']:>10,}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
