"""Make ``aiocoll.transports`` importable from a source checkout.

Installed, ``transports/`` lives at ``aiocoll/transports/`` (pyproject's package-dir mapping) and
this does nothing. In a checkout it sits beside ``aiocoll/``; we load it under its installed
name so that code, tests and examples only ever say ``aiocoll.transports``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def mount_transports() -> None:
    here = Path(__file__).resolve().parent
    if (here / "transports").is_dir() or "aiocoll.transports" in sys.modules:
        return
    src = here.parent / "transports" / "__init__.py"
    if not src.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "aiocoll.transports", src, submodule_search_locations=[str(src.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aiocoll.transports"] = module
    spec.loader.exec_module(module)
