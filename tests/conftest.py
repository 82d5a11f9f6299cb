"""Shared test set-up.

The suite tests the installed package (``pip install -e '.[test]'``, as README and .ci/run do):
installing is the one way ``transports/`` becomes ``aiocoll.transports`` (pyproject's
package-dir), so a checkout that was never installed fails here with that hint.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("aiocoll") is None or importlib.util.find_spec("aiocoll.transports") is None:
    raise RuntimeError("aiocoll is not installed in this interpreter: run pip install -e '.[test]' first")
