"""``python -m aiocoll.transports``: list the transports found, installed or not, and why."""

from __future__ import annotations

import sys

from ._registry import available_transports


def main() -> int:
    rows = available_transports()
    width = max((len(r.name) for r in rows), default=4)
    for r in rows:
        state = "available" if r.available else "unavailable"
        line = f"{r.name:<{width}}  {state:<11}  {r.target}"
        if r.error:
            line += f"\n{'':<{width}}  {'':<11}  why: {r.error}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
