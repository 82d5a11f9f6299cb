"""aiocoll for PyTorch: functional collectives with the signatures of
``torch.distributed._functional_collectives``, over aiocoll.

    import aiocoll.sync
    import aiocoll.torch as funcol          # instead of torch.distributed._functional_collectives

    aiocoll.sync.init()                     # or: await aiocoll.init() in async code
    y = funcol.all_reduce(x, "sum", group=[0, 1])     # returns at once
    z = y * 2                               # first real use waits for the collective

Every collective starts at once and returns an :class:`AsyncCollectiveTensor` that waits on
first real use (views do not wait). They are differentiable (sum reductions, gathers,
scatters, all-to-all, broadcast, permute), work on CPU and CUDA tensors, give output shapes
on meta and fake tensors without a group, and are the ops ``torch.ops.aiocoll.*`` so that
``make_fx`` and ``torch.compile`` trace them, each followed by ``aiocoll::wait_tensor``.

Importing this module also registers the torch.distributed backend ``"aiocoll"``:
``torch.distributed.init_process_group("aiocoll")`` runs torch.distributed code (DDP included)
over aiocoll's transports.

From a thread without a running event loop (a training loop), the collectives run on the
event loop that serves the world (``aiocoll.sync``'s background loop after
``aiocoll.sync.init()``). From async code on the world's own loop, they run as tasks of that
loop; there ``await t`` (or ``await wait_async(t)``) before using a result, since blocking
would stall the loop.
"""

from __future__ import annotations

import torch

from . import _ops_registry  # noqa: F401  (defines torch.ops.aiocoll.*)
from ._async_tensor import AsyncCollectiveTensor
from ._funcol import (
    RANK_TYPES,
    _expand_group,
    all_gather_into_tensor_coalesced,
    all_gather_single,
    all_gather_single_autograd,
    all_gather_single_coalesced,
    all_gather_tensor,
    all_gather_tensor_autograd,
    all_reduce,
    all_reduce_autograd,
    all_reduce_coalesced,
    all_to_all_single,
    all_to_all_single_autograd,
    broadcast,
    permute_tensor,
    reduce_scatter_single,
    reduce_scatter_single_autograd,
    reduce_scatter_single_coalesced,
    reduce_scatter_tensor,
    reduce_scatter_tensor_autograd,
    reduce_scatter_tensor_coalesced,
    wait_async,
    wait_tensor,
)

if torch.distributed.is_available():
    from ._backend import register as _register_backend

    _register_backend()  # torch.distributed.init_process_group("aiocoll", ...)

__all__ = [
    # collectives (torch.distributed._functional_collectives names)
    "all_reduce",
    "all_gather_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
    "permute_tensor",
    "all_reduce_coalesced",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced",
    # the *_autograd names and torch's newer *_single spellings
    "all_reduce_autograd",
    "all_gather_tensor_autograd",
    "reduce_scatter_tensor_autograd",
    "all_to_all_single_autograd",
    "all_gather_single",
    "all_gather_single_autograd",
    "reduce_scatter_single",
    "reduce_scatter_single_autograd",
    "all_gather_single_coalesced",
    "reduce_scatter_single_coalesced",
    # results
    "AsyncCollectiveTensor",
    "wait_tensor",
    "wait_async",
    "RANK_TYPES",
]
