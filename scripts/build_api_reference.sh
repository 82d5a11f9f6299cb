#!/usr/bin/env bash
# The API reference, generated from the docstrings with pdoc (in the [test] extra):
#   bash scripts/build_api_reference.sh [OUT_DIR]      # default docs/api; open OUT_DIR/index.html
# tests/project/test_api_reference.py builds it the same way, so a docstring that breaks it fails the suite.
set -euo pipefail
out="${1:-docs/api}"
python="${PYTHON:-python3}"
exec "$python" -m pdoc aiocoll aiocoll.sync aiocoll.torch aiocoll.testing --docformat google -o "$out"
