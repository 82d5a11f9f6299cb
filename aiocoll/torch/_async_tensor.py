"""AsyncCollectiveTensor: a collective's result that waits for the collective on first real use.

It wraps the output tensor the collective fills in the background. Any op on it waits first,
except view ops (``view``, ``reshape`` of a contiguous tensor, ``t``, slicing, ``detach``...),
whose results are lazy results too, sharing the same wait. Printing, ``tolist()``, ``numpy()``
and ``item()`` wait. In async code, ``await t`` (or ``await aiocoll.torch.wait_async(t)``)
waits without blocking the loop.

A result that is never used is still completed in the background (every member issued the
collective, so nobody hangs) and its memory is freed when it is done; ``aiocoll.sync.destroy``
waits for such work, and an error in one is logged.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from ._work import Work, wait_for, work_of

_ATEN_VIEW = torch.ops.aten.view.default


def _is_view(func: Any) -> bool:
    """Whether ``func`` returns an alias of its first argument without writing it."""
    if not isinstance(func, torch._ops.OpOverload):
        return False
    # Composite-implicit ops decompose into other ops before reaching us; do not trust their schema.
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(),  # type: ignore[no-untyped-call]
                                                    torch._C.DispatchKey.CompositeImplicitAutograd):
        return False
    args = func._schema.arguments
    if not args:
        return False
    alias = args[0].alias_info
    return alias is not None and not alias.is_write


class AsyncCollectiveTensor(torch.Tensor):
    """The lazy result of an ``aiocoll.torch`` collective (a ``torch.Tensor`` for every purpose).

    Attributes:
        elem: the tensor the collective fills (do not read it before waiting).
        completed: whether this wrapper has waited.
    """

    elem: torch.Tensor
    work: Work | None
    completed: bool

    __slots__ = ("elem", "work", "completed")

    @staticmethod
    def __new__(cls, elem: torch.Tensor, work: Work | None = None) -> AsyncCollectiveTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=elem.device,
            requires_grad=False,
        )
        r.elem = elem
        r.work = work if work is not None else work_of(elem)
        r.completed = r.work is None
        return r

    def __init__(self, elem: torch.Tensor, work: Work | None = None) -> None:
        super().__init__()

    # ------------------------------------------------------------------ waiting
    def trigger_wait(self) -> torch.Tensor:
        """Wait for the collective (once) and return the filled tensor.

        Raises:
            CollectiveError (and others): what the collective raised.
            RuntimeError: not finished and called on the event loop that runs it (use ``await``).
        """
        if not self.completed:
            if self.work is not None:
                self.work.wait()
            wait_for(self.elem)
            self.completed = True
        return self.elem

    def wait(self) -> torch.Tensor:
        """Same as :meth:`trigger_wait`."""
        return self.trigger_wait()

    def __await__(self) -> Generator[Any, None, torch.Tensor]:
        if not self.completed and self.work is not None:
            yield from self.work.wait_async().__await__()
        return self.trigger_wait()

    # ------------------------------------------------------------------ reading
    def tolist(self) -> Any:
        return self.trigger_wait().tolist()

    def numpy(self, *, force: bool = False) -> Any:  # type: ignore[override, unused-ignore]
        return self.trigger_wait().numpy(force=force)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"AsyncCollectiveTensor({self.trigger_wait()!r})"

    # ------------------------------------------------------------------ tracing support
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: Any, outer_size: Any, outer_stride: Any) -> AsyncCollectiveTensor:
        return AsyncCollectiveTensor(inner["elem"])

    def __coerce_same_metadata_as_tangent__(self, expected_metadata: Any, expected_type: type | None = None) -> Any:
        if expected_type is not torch.Tensor:
            return None
        return self.trigger_wait()

    # ------------------------------------------------------------------ dispatch
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        kwargs = kwargs or {}
        if func is _ATEN_VIEW:  # the most common view, kept off the generic path
            a = args[0]
            return AsyncCollectiveTensor(func(a.elem, *args[1:], **kwargs), None if a.completed else a.work)

        if _is_view(func):
            works = [a.work for a in _lazies(args, kwargs) if not a.completed and a.work is not None]
            out = func(*tree_map_only(AsyncCollectiveTensor, lambda a: a.elem, args),
                       **tree_map_only(AsyncCollectiveTensor, lambda a: a.elem, kwargs))
            work = works[0] if works else None
            return tree_map_only(torch.Tensor, lambda t: AsyncCollectiveTensor(t, work) if work else t, out)

        def real(a: AsyncCollectiveTensor) -> torch.Tensor:
            return a.trigger_wait()

        return func(*tree_map_only(AsyncCollectiveTensor, real, args), **tree_map_only(AsyncCollectiveTensor, real, kwargs))


def _lazies(args: Any, kwargs: Any) -> list[AsyncCollectiveTensor]:
    found: list[AsyncCollectiveTensor] = []

    def note(a: AsyncCollectiveTensor) -> AsyncCollectiveTensor:
        found.append(a)
        return a

    tree_map_only(AsyncCollectiveTensor, note, (args, kwargs))
    return found


class _Wrap(torch.autograd.Function):
    """Identity for autograd between an op's output and its lazy wrapper."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, work: Work | None) -> torch.Tensor:  # type: ignore[override, unused-ignore]
        return AsyncCollectiveTensor(t, work)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override, unused-ignore]
        return grad, None


def lazy(t: torch.Tensor) -> torch.Tensor:
    """``t`` (an op's output) as a lazy result, differentiable if ``t`` is."""
    work = work_of(t)
    if work is None:
        return t  # nothing in flight (meta tensors, or already waited)
    if t.requires_grad and torch.is_grad_enabled():
        return _Wrap.apply(t, work)  # type: ignore[no-untyped-call,no-any-return]
    return AsyncCollectiveTensor(t, work)
