"""DeviceMesh: an n-d array of global ranks whose dimensions name groups (torch's shape, no torch).

Along dimension d, the ranks that share every other coordinate form one group: in the mesh
``[[0, 1], [2, 3]]`` dim 0 gives {0, 2} and {1, 3}, dim 1 gives {0, 1} and {2, 3}. Each rank
sees the group that holds it. Groups are tagged ``"mesh:<shape>-<hash>:<dims>"`` from the root
mesh's rank array and the root dimensions they span, so every member (and every submesh or
repeated call on one member) gets the same group object without talking to anyone.

Submeshes (``mesh["tp"]``, ``mesh["dp", "cp"]``) and flattened dimensions (``flatten``) are views
of a root mesh: they keep, for each of their dimensions, the tuple of root dimensions it spans.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .group import ProcessGroup
from ..core.world import current_world

if TYPE_CHECKING:
    from ..core.world import World

Dim = int | str
"""A mesh dimension: its index (negative counts from the end) or its name."""


def _rank_array(mesh: Any, world_size: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    if isinstance(mesh, DeviceMesh):
        raise TypeError("DeviceMesh(...) takes an array of ranks; to slice a mesh, use mesh['name']")
    if isinstance(mesh, (str, bytes)):
        raise TypeError(f"a mesh must be an n-d array of integer ranks, got {type(mesh).__name__}")
    try:
        a = np.array(mesh)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"a mesh must be a rectangular n-d array of ranks (equal-length rows): {exc}") from None
    if a.ndim == 0:
        raise ValueError(f"a mesh needs at least one dimension, got the scalar {mesh!r}")
    if a.size == 0:
        raise ValueError(f"a mesh needs at least one rank, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"mesh entries must be integer ranks, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= world_size:
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        raise ValueError(f"mesh rank {bad} out of range for a world of size {world_size}")
    values, counts = np.unique(a, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"mesh ranks must be distinct; repeated: {values[counts > 1].tolist()}")
    a.setflags(write=False)
    return a


def _check_names(names: Any, ndim: int) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"dim_names must be a sequence of strings, one per dimension, got {names!r}")
    out = tuple(names)
    for n in out:
        if not isinstance(n, str) or not n:
            raise TypeError(f"dim_names must be non-empty strings, got {n!r}")
    if len(out) != ndim:
        raise ValueError(f"dim_names {out} has {len(out)} names for a mesh of {ndim} dimensions")
    if len(set(out)) != len(out):
        raise ValueError(f"dim_names must be distinct, got {out}")
    return out


def _pick_names(dim_names: Any, mesh_dim_names: Any) -> Any:
    if dim_names is not None and mesh_dim_names is not None:
        raise TypeError("pass dim_names or mesh_dim_names (its torch spelling), not both")
    return dim_names if dim_names is not None else mesh_dim_names


class DeviceMesh:
    """An n-d array of global ranks; each dimension names a family of groups.

    ``DeviceMesh([[0, 1], [2, 3]], dim_names=("dp", "tp"))`` (nested lists or any n-d integer
    array). Creating one, slicing it and asking for its groups are local: no collective, no
    new connection. The mesh belongs to the world current when it is made.

    Group ranks are sorted, as for every group, so ``get_local_rank(d)`` is this rank's
    position in ``get_group(d)``; it equals ``get_coordinate()[d]`` when ranks increase along
    ``d`` (as in ``init_device_mesh``).

    Attributes:
        mesh: the rank array (read-only numpy array; for a submesh, this rank's slice).
        mesh_dim_names / dim_names: the dimension names, or None.
        ndim, shape: of ``mesh``.

    Raises:
        TypeError: entries are not integers; names are not strings.
        ValueError: not rectangular, empty, a rank out of range or repeated, wrong number of
            names or repeated names.
        NotInitializedError: no world yet (call ``aiocoll.init`` first).
    """

    _world: World
    _root: DeviceMesh
    _array: np.ndarray[Any, np.dtype[np.int64]]
    _dims: tuple[tuple[int, ...], ...]
    _names: tuple[str, ...] | None
    # root only
    _full: np.ndarray[Any, np.dtype[np.int64]]
    _id: str
    _coord: tuple[int, ...] | None
    _flat: dict[str, tuple[int, ...]]
    _groups: dict[tuple[int, ...], ProcessGroup]

    def __init__(
        self, mesh: Any, dim_names: Sequence[str] | None = None, *, mesh_dim_names: Sequence[str] | None = None
    ) -> None:
        world = current_world()
        array = _rank_array(mesh, world.world_size)
        self._world = world
        self._root = self
        self._array = array
        self._full = array
        self._dims = tuple((d,) for d in range(array.ndim))
        self._names = _check_names(_pick_names(dim_names, mesh_dim_names), array.ndim)
        digest = hashlib.blake2b(array.tobytes(), digest_size=4, person=b"aiocoll-mesh").hexdigest()
        self._id = "x".join(map(str, array.shape)) + "-" + digest
        where = np.argwhere(array == world.rank)
        self._coord = tuple(int(v) for v in where[0]) if len(where) else None
        self._flat = {}
        self._groups = {}

    @classmethod
    def _view(cls, root: DeviceMesh, dims: tuple[tuple[int, ...], ...], names: tuple[str, ...] | None) -> DeviceMesh:
        view = object.__new__(cls)
        view._world = root._world
        view._root = root
        view._dims = dims
        view._names = names
        view._array = root._slice(dims)
        return view

    # ----------------------------------------------------------------- torch-compatible surface
    @property
    def mesh(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The ranks, as a read-only n-d numpy array."""
        return self._array

    @property
    def mesh_dim_names(self) -> tuple[str, ...] | None:
        return self._names

    @property
    def dim_names(self) -> tuple[str, ...] | None:
        return self._names

    @property
    def ndim(self) -> int:
        return int(self._array.ndim)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array.shape)

    def size(self, dim: Dim | None = None) -> int:
        """Number of ranks in the mesh, or along ``dim`` (an index or a name).

        Raises:
            TypeError / ValueError: ``dim`` is not a dimension of this mesh.
        """
        if dim is None:
            return int(self._array.size)
        return math.prod(int(self._root._full.shape[d]) for d in self._resolve(dim))

    def get_rank(self) -> int:
        """This process's global rank."""
        return self._world.rank

    def get_coordinate(self) -> tuple[int, ...] | None:
        """This rank's index in ``mesh``, or None if it is not in the mesh."""
        where = np.argwhere(self._array == self._world.rank)
        return tuple(int(v) for v in where[0]) if len(where) else None

    def get_group(self, dim: Dim | None = None) -> ProcessGroup:
        """The group along ``dim`` (index or name; may be left out for a 1-d mesh) holding this rank.

        Repeated calls, on this mesh or on any submesh sharing the dimension, return the same object.

        Raises:
            ValueError: ``dim`` left out on an n-d mesh; no such dimension; this rank is not in the mesh.
            TypeError: ``dim`` is neither an int nor a str.
        """
        return self._root._group_along(self._resolve(dim))

    def get_all_groups(self) -> list[ProcessGroup]:
        """``get_group(d)`` for every dimension, in order."""
        return [self.get_group(d) for d in range(self.ndim)]

    def get_local_rank(self, dim: Dim | None = None) -> int:
        """This rank's group rank in ``get_group(dim)``.

        Raises:
            As ``get_group``.
        """
        return self.get_group(dim).rank

    def __getitem__(self, names: str | Sequence[str]) -> DeviceMesh:
        """The submesh of the named dimensions (in the order given) that holds this rank.

        ``mesh["tp"]`` is 1-d; ``mesh["dp", "cp"]`` is 2-d. Names of flattened dimensions
        (see ``flatten``) work too.

        Raises:
            TypeError: a name is not a string (use ``get_group(index)`` for indices).
            ValueError: an unknown name; a dimension named twice; this rank is not in the mesh.
        """
        keys = (names,) if isinstance(names, str) else names
        if not isinstance(keys, Sequence) or not keys or not all(isinstance(k, str) for k in keys):
            raise TypeError(
                f"a mesh is sliced by dimension names (mesh['tp'] or mesh['dp', 'tp']), got {names!r}"
            )
        keys = tuple(keys)
        if self._names is not None and keys == self._names:
            return self
        return DeviceMesh._view(self._root, tuple(self._resolve(k) for k in keys), keys)

    def flatten(self, dims: Sequence[Dim] | None = None, name: str | None = None) -> DeviceMesh:
        """One dimension made of ``dims`` (default: all), as a 1-d mesh holding this rank.

        The flattened ranks run in C order over ``dims`` as given. ``name`` (default: the dims'
        names joined by ``"_"``, when they all have names) registers the new dimension on the
        root mesh, so that ``root[name]``, ``root.get_group(name)`` and ``(root, name)`` find it.

        Raises:
            ValueError: ``name`` already names other dimensions; a dimension given twice;
                unknown dimensions; this rank is not in the mesh.
            TypeError: ``name`` is not a string.
        """
        picked: Sequence[Dim] = range(self.ndim) if dims is None else dims
        if isinstance(picked, (str, int)):
            picked = (picked,)
        span = tuple(d for p in picked for d in self._resolve(p))
        if not span:
            raise ValueError("flatten needs at least one dimension")
        if len(set(span)) != len(span):
            raise ValueError(f"flatten: a dimension is given twice in {list(picked)}")
        if name is None:
            labels = [self._label(p) for p in picked]
            name = "_".join(label for label in labels if label) if all(labels) else None
        elif not isinstance(name, str) or not name:
            raise TypeError(f"a flattened dimension's name must be a non-empty string, got {name!r}")
        if name is not None:
            self._root._register(name, span)
        return DeviceMesh._view(self._root, (span,), (name,) if name is not None else None)

    def _flatten(self, mesh_dim_name: str | None = None) -> DeviceMesh:
        """torch's spelling of ``flatten(None, mesh_dim_name)``: all dimensions into one."""
        return self.flatten(None, mesh_dim_name)

    # ----------------------------------------------------------------- internals
    def _label(self, dim: Dim) -> str | None:
        if isinstance(dim, str):
            return dim
        if self._names is None:
            return None
        return self._names[self._index(dim)]

    def _index(self, dim: int) -> int:
        if not -self.ndim <= dim < self.ndim:
            raise ValueError(f"dim {dim} out of range for a {self.ndim}-d mesh")
        return int(dim) % self.ndim

    def _resolve(self, dim: Dim | None) -> tuple[int, ...]:
        """The root dimensions that ``dim`` of this mesh spans."""
        if dim is None:
            if self.ndim != 1:
                raise ValueError(f"this mesh has {self.ndim} dimensions: say which (an index or a name)")
            return self._dims[0]
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer, str)):
            raise TypeError(f"a mesh dimension is an int index or a str name, got {dim!r}")
        if isinstance(dim, str):
            if self._names is not None and dim in self._names:
                return self._dims[self._names.index(dim)]
            if dim in self._root._flat:
                return self._root._flat[dim]
            known = list(self._names or ()) + list(self._root._flat)
            raise ValueError(f"no mesh dimension named {dim!r}; this mesh knows {known}")
        return self._dims[self._index(int(dim))]

    def _slice(self, dims: tuple[tuple[int, ...], ...]) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The ranks along root ``dims`` (each a tuple of root dims, flattened), through this rank."""
        full = self._full
        order = [d for span in dims for d in span]
        if len(set(order)) != len(order):
            raise ValueError("a mesh dimension cannot be used twice in one submesh")
        rest = [d for d in range(full.ndim) if d not in order]
        moved = np.transpose(full, rest + order)
        if rest:
            if self._coord is None:
                raise ValueError(
                    f"rank {self._world.rank} is not in the mesh {full.tolist()}: it has no group or submesh there"
                )
            moved = moved[tuple(self._coord[d] for d in rest)]
        shape = tuple(math.prod(int(full.shape[d]) for d in span) for span in dims)
        out = moved.reshape(shape)
        out.setflags(write=False)
        return out

    def _group_along(self, span: tuple[int, ...]) -> ProcessGroup:
        key = tuple(sorted(span))
        group = self._groups.get(key)
        if group is None:
            if self._coord is None:
                raise ValueError(f"rank {self._world.rank} is not in the mesh {self._full.tolist()}")
            ranks = self._slice((key,))
            tag = f"mesh:{self._id}:{'+'.join(map(str, key))}"
            group = self._world.registry.new_group(ranks.tolist(), tag=tag)
            self._groups[key] = group
        return group

    def _register(self, name: str, span: tuple[int, ...]) -> None:
        if self._names is not None and name in self._names:
            if (self._names.index(name),) != span:
                raise ValueError(f"{name!r} already names dimension {self._names.index(name)} of the mesh")
            return
        known = self._flat.get(name)
        if known is not None and known != span:
            raise ValueError(f"{name!r} already names the flattened root dimensions {known}, not {span}")
        self._flat[name] = span

    # ----------------------------------------------------------------- dunder
    def __repr__(self) -> str:
        names = f", dim_names={self._names}" if self._names else ""
        return f"DeviceMesh({self._array.tolist()}{names})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceMesh):
            return NotImplemented
        return (
            self._root._id == other._root._id
            and self._dims == other._dims
            and self._names == other._names
            and np.array_equal(self._array, other._array)
        )

    def __hash__(self) -> int:
        return hash((self._root._id, self._dims, self._names, self._array.tobytes()))


def init_device_mesh(
    shape: int | Sequence[int] | str,
    dim_names: Sequence[str] | Sequence[int] | int | None = None,
    *,
    mesh_dim_names: Sequence[str] | None = None,
    mesh_shape: int | Sequence[int] | None = None,
) -> DeviceMesh:
    """A mesh of every rank of the world, 0..N-1 in C order, of the given shape.

    ``init_device_mesh((2, 4), ("dp", "tp"))``: dp groups are columns {0, 4}, {1, 5}, ...;
    tp groups are rows {0..3}, {4..7}. Local: no collective, no new connection.

    torch's signature works too: ``init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "tp"))``
    (or ``mesh_shape=``). The device type is accepted and not needed: a mesh holds ranks, and
    the collectives run on whatever device the tensors given to them are on.

    Raises:
        TypeError: ``shape`` is not an int or a sequence of ints; torch's form without a shape.
        ValueError: a non-positive size, or the sizes do not multiply to the world size.
        NotInitializedError: before ``aiocoll.init``.
    """
    if isinstance(shape, str):  # torch's (device_type, mesh_shape, *, mesh_dim_names)
        if dim_names is not None and mesh_shape is not None:
            raise TypeError("init_device_mesh: the mesh shape is given twice (positionally and as mesh_shape)")
        given = dim_names if mesh_shape is None else mesh_shape
        if given is None:
            raise TypeError(f"init_device_mesh({shape!r}, ...) is torch's form: pass the mesh shape after the device type")
        shape, dim_names = given, None  # type: ignore[assignment]
    elif mesh_shape is not None:
        raise TypeError("init_device_mesh: mesh_shape= goes with torch's form init_device_mesh(device_type, mesh_shape)")
    dims = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else shape
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise TypeError(f"a mesh shape is an int or a non-empty sequence of ints, got {shape!r}")
    for s in dims:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"mesh sizes must be integers, got {s!r} in {shape!r}")
        if s < 1:
            raise ValueError(f"mesh sizes must be positive, got {tuple(dims)}")
    world_size = current_world().world_size
    total = math.prod(int(s) for s in dims)
    if total != world_size:
        raise ValueError(f"a mesh of shape {tuple(int(s) for s in dims)} has {total} ranks; the world has {world_size}")
    return DeviceMesh(
        np.arange(world_size).reshape(tuple(int(s) for s in dims)),
        _pick_names(dim_names, mesh_dim_names),
    )
