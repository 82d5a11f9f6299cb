"""One rank of ``aiocoll.testing.run_processes``: ``python -m aiocoll.testing._rank_main FILE
QUALNAME RESULTS_DIR`` under the launcher; writes ``RESULTS_DIR/<rank>.json``."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return tolist()
    raise TypeError(f"run_processes: a rank returned {type(value).__name__}, which JSON cannot carry")


def _load(path: str, qualname: str) -> Any:
    name = f"_aiocoll_rank_target_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


async def _main(path: str, qualname: str, results: str) -> None:
    import aiocoll

    fn = _load(path, qualname)
    async with aiocoll.init() as world:
        if inspect.iscoroutinefunction(fn):
            value = await fn(world.rank)
        else:
            # Blocking code (aiocoll.sync) on a thread of its own: this loop serves its calls.
            from . import in_thread
            from .. import sync

            sync.bind()
            value = await in_thread(fn, world.rank)
            if inspect.isawaitable(value):
                value = await value
        text = json.dumps(value, default=_jsonable)
    tmp = Path(results, f"{world.rank}.json.tmp")
    tmp.write_text(text)
    os.replace(tmp, Path(results, f"{world.rank}.json"))


def main() -> None:
    path, qualname, results = sys.argv[1:4]
    from ..core.loop import run

    run(_main(path, qualname, results))


if __name__ == "__main__":
    main()
