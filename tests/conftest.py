"""Shared test set-up.

The suite tests the installed package (``pip install '.[test]'``, as README and .ci/run do).
From a source checkout that was never installed, it falls back to the tree this file sits in.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("aiocoll") is None:
    sys.path.insert(0, str(REPO))
