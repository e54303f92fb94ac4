"""End-to-end benchmark (same as ``sala bench e2e``); never collected by pytest.

    python benchmarks/bench_e2e.py                                  # released shapes, 32K..1M, one GPU
    python benchmarks/bench_e2e.py --contexts 32K,256K --systems sala,dense
    python benchmarks/bench_e2e.py --shape tiny --contexts 64,256 --device cpu   # CPU smoke run

Writes e2e.json / e2e.md / e2e.png to --out (default out/e2e). See sala.engine.bench.
"""

from __future__ import annotations

import sys

from sala.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
