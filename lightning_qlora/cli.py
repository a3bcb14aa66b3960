"""The ``lightning-qlora`` console command.

* ``lightning-qlora [hydra overrides]`` -- the training app (:mod:`lightning_qlora.train`);
* ``lightning-qlora serve adapters_dir=... [key=value ...]`` -- the multi-adapter server
  (:mod:`lightning_qlora.serving.cli`).
"""

from __future__ import annotations

import sys


def main() -> None:
    from lightning_qlora.app.quiet import quiet_third_party

    quiet_third_party()  # here, at the entry point only: the library never filters warnings
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        from lightning_qlora.serving.cli import main as serve

        serve(sys.argv[2:])
        return
    from lightning_qlora.train import main as train

    train()


if __name__ == "__main__":
    main()
