"""aiocoll: asyncio-native collective communication.

    import aiocoll
    pg = await aiocoll.init()                      # torchrun / MPI / SLURM environment
    y = await aiocoll.all_reduce(x)                # never blocks the event loop
    await aiocoll.destroy()

Everything public is listed in ``__all__`` below (a test keeps it honest). The sub-packages are
the implementation, one layer each (see README's "Where things live"): core, arrays,
collectives, algorithms, engines, groups, store, launch, plus the ``transports`` it is
installed with, ``torch`` and ``testing``. Errors: see ``aiocoll.core.errors`` for the tree.
"""

from __future__ import annotations

import typing as _typing

from .collectives.tensors import barrier, send

if _typing.TYPE_CHECKING:
    # What the checker sees: overloads that keep the array type and name the ops (collectives/_typing.pyi).
    from .collectives._typing import (
        all_gather,
        all_gather_coalesced,
        all_reduce,
        all_reduce_coalesced,
        all_to_all,
        broadcast,
        gather,
        permute,
        recv,
        reduce,
        reduce_scatter,
        reduce_scatter_coalesced,
        scatter,
    )
else:
    from .collectives.tensors import (
        all_gather,
        all_gather_coalesced,
        all_reduce,
        all_reduce_coalesced,
        all_to_all,
        broadcast,
        gather,
        permute,
        recv,
        reduce,
        reduce_scatter,
        reduce_scatter_coalesced,
        scatter,
    )
from .core.errors import (
    AiocollError,
    CollectiveError,
    CollectiveTimeoutError,
    GroupBrokenError,
    HandshakeError,
    MismatchError,
    NotInitializedError,
    PeerFailureError,
    RemoteAbortError,
    StoreError,
    TransportError,
)
from .groups.group import ProcessGroup
from .groups.api import (
    destroy_group,
    expand_group,
    find_group,
    find_or_create_group,
    new_group,
    new_subgroups,
    renew_group,
)
from .groups.mesh import DeviceMesh, init_device_mesh
from .core.loop import run
from .collectives.objects import all_gather_object, broadcast_object
from .arrays.ops import ReduceOp
from .core.settings import Settings
from .core.world import destroy, init, world

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # starting and stopping
    "run",
    "init",
    "Settings",
    "destroy",
    "world",
    # collectives
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "permute",
    "all_reduce_coalesced",
    "all_gather_coalesced",
    "reduce_scatter_coalesced",
    "ReduceOp",
    "all_gather_object",
    "broadcast_object",
    # groups
    "ProcessGroup",
    "new_group",
    "find_group",
    "find_or_create_group",
    "new_subgroups",
    "destroy_group",
    "renew_group",
    "expand_group",
    "DeviceMesh",
    "init_device_mesh",
    # errors
    "AiocollError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "GroupBrokenError",
    "HandshakeError",
    "MismatchError",
    "NotInitializedError",
    "PeerFailureError",
    "RemoteAbortError",
    "StoreError",
    "TransportError",
]
