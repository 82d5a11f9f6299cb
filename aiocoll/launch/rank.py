"""What ``aiocoll run`` starts in each rank: pick the event loop, then run the user's program.

    python -m aiocoll.launch.rank script.py args...      (or: -m module args...)

With uvloop installed (and AIOCOLL_LOOP not "asyncio") the user's plain ``asyncio.run`` gets a
uvloop loop; otherwise nothing changes. The program runs as ``__main__`` with ``sys.argv`` and
``sys.path[0]`` as ``python script.py`` would set them.
"""

from __future__ import annotations

import os
import runpy
import sys

from ..core.loop import install_policy


def main() -> None:
    args = sys.argv[1:]
    if not args:
        raise SystemExit("usage: python -m aiocoll.launch.rank script.py [args] | -m module [args]")
    install_policy()
    if args[0] == "-m":
        if len(args) < 2:
            raise SystemExit("-m needs a module name")
        sys.argv = [args[1], *args[2:]]
        sys.path.insert(0, os.getcwd())  # as `python -m module` would (we start with -P)
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = args[0]
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` would
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
