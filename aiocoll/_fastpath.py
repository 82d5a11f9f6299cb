"""Same-host fast paths: collectives computed in shared memory instead of by message passing.

``fastpath_for(group, collective, nbytes)`` returns an engine when every member of ``group``
is on this host and a shared-memory engine beats message passing for that size, else None.
(Placeholder: issue 3 provides the engine.)
"""

from __future__ import annotations

from typing import Any

from ._group import ProcessGroup


def fastpath_for(group: ProcessGroup, collective: str, nbytes: int) -> Any:
    """The engine to run ``collective`` of ``nbytes`` per rank on ``group``, or None."""
    return None
