"""``torchrun --nproc-per-node N -m sala.train RECIPE [--out DIR] [--resume | --force]`` (one process works too)."""

from __future__ import annotations

import sys

from sala.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
