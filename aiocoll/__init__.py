"""aiocoll: asyncio-native collective communication.

    import aiocoll
    pg = await aiocoll.init()                      # torchrun / MPI / SLURM environment
    y = await aiocoll.all_reduce(x)                # never blocks the event loop
    await aiocoll.destroy()

Everything public is listed in ``__all__`` below (a test keeps it honest); implementation
modules are private (``_name``). Errors: see ``aiocoll._errors`` for the tree.
"""

from __future__ import annotations

from . import _layout

_layout.mount_transports()

from ._collectives import (  # noqa: E402
    all_gather,
    all_gather_coalesced,
    all_reduce,
    all_reduce_coalesced,
    all_to_all,
    barrier,
    broadcast,
    gather,
    permute,
    recv,
    reduce,
    reduce_scatter,
    reduce_scatter_coalesced,
    scatter,
    send,
)
from ._errors import (  # noqa: E402
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
from ._group import ProcessGroup  # noqa: E402
from ._groups_api import (  # noqa: E402
    destroy_group,
    expand_group,
    find_group,
    find_or_create_group,
    new_group,
    new_subgroups,
)
from ._mesh import DeviceMesh, init_device_mesh  # noqa: E402
from ._loop import run  # noqa: E402
from ._objects import all_gather_object, broadcast_object  # noqa: E402
from ._ops import ReduceOp  # noqa: E402
from ._world import destroy, init, world  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # starting and stopping
    "run",
    "init",
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
