"""Groups (SPEC section 3): expand_group, the registry, tags, DeviceMesh, and every group form in
every collective. Many ranks in one process over inproc; references computed with numpy."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aiocoll
from aiocoll.testing import run_ranks

SIZES = [4, 8]
REPO = Path(__file__).resolve().parents[2]


def x_of(rank: int, shape: tuple[int, ...] = (4, 3), dtype: Any = np.int64) -> np.ndarray:
    """Rank-specific data: equal on no two ranks."""
    return (np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) * 7 + 100 * rank + 1).astype(dtype)


def mesh_groups(ranks: np.ndarray, dim: int) -> list[list[int]]:
    """Reference: the groups along ``dim`` of a rank array (sorted ranks)."""
    moved = np.moveaxis(ranks, dim, -1).reshape(-1, ranks.shape[dim])
    return [sorted(int(r) for r in row) for row in moved]


def holding(groups: list[list[int]], rank: int) -> list[int]:
    (g,) = [g for g in groups if rank in g]
    return g


# =============================================================================== expand_group
def test_expand_1d_list_keeps_ranks_and_tag():
    assert aiocoll.expand_group([3, 1, 2]) == ("", [3, 1, 2], 3)
    assert aiocoll.expand_group([3, 1, 2], "dp") == ("dp", [3, 1, 2], 3)
    assert aiocoll.expand_group(np.array([5, 4])) == ("", [5, 4], 2)


def test_expand_2d_list_flattens_with_the_sublist_size():
    assert aiocoll.expand_group([[0, 1], [2, 3]], "t") == ("t", [0, 1, 2, 3], 2)
    assert aiocoll.expand_group([[0, 2, 4], [1, 3, 5]]) == ("", [0, 2, 4, 1, 3, 5], 3)
    assert aiocoll.expand_group(np.arange(8).reshape(4, 2)) == ("", list(range(8)), 2)


def test_expand_2d_list_of_unequal_sizes_raises():
    with pytest.raises(ValueError, match="group sizes must be identical, found 2 and 3"):
        aiocoll.expand_group([[0, 1], [2, 3, 4]])


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (42, ValueError, "ProcessGroup.*list of global ranks.*DeviceMesh.*\\(DeviceMesh, dim\\)"),
        (object(), ValueError, "cannot use object"),
        ({0, 1}, ValueError, "cannot use set"),
        ([], ValueError, "empty rank list"),
        ([[0, 1], 2], ValueError, "mixes ranks and lists"),
        ([[[0, 1]], [[2, 3]]], ValueError, "more levels"),
        ([0, 1, 1], ValueError, r"distinct: rank \[1\] repeated"),
        ([[0, 1], [1, 2]], ValueError, "disjoint"),
        ([0, "1"], TypeError, "must be integers"),
        ([0, 1.0], TypeError, "must be integers"),
        ([True, False], TypeError, "must be integers"),
        ([0, -1], ValueError, "non-negative"),
    ],
    ids=["int", "object", "set", "empty", "mixed", "3d", "dup", "overlap", "str-rank", "float", "bool", "neg"],
)
def test_expand_rejects_other_forms(bad, err, match):
    with pytest.raises(err, match=match):
        aiocoll.expand_group(bad)


def test_expand_rejects_a_non_string_tag():
    with pytest.raises(TypeError, match="tag must be a string"):
        aiocoll.expand_group([0, 1], tag=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", SIZES)
async def test_expand_group_gives_its_own_ranks_and_tag_unless_one_is_passed(world_size):
    async def body(rank):
        g = aiocoll.new_group([world_size - 1, 0, 2], tag="dp")
        return (
            aiocoll.expand_group(g),
            aiocoll.expand_group(g, "other"),
            aiocoll.expand_group(g.name),
            aiocoll.expand_group(None),
        )

    for own, other, by_name, world in await run_ranks(body, world_size):
        assert own == ("dp", [0, 2, world_size - 1], 3)
        assert other == ("other", [0, 2, world_size - 1], 3)
        assert by_name == own
        assert world == ("untagged:world", list(range(world_size)), world_size)


@pytest.mark.parametrize("world_size", SIZES)
async def test_expand_mesh_forms(world_size):
    shape = (2, world_size // 2)
    ranks = np.arange(world_size).reshape(shape)

    async def body(rank):
        mesh = aiocoll.DeviceMesh(ranks, dim_names=("dp", "tp"))
        with pytest.raises(ValueError, match=r"2-d DeviceMesh .*pass \(mesh, dim\)"):
            aiocoll.expand_group(mesh)
        with pytest.raises(ValueError, match=r"\(DeviceMesh, dim\)"):
            aiocoll.expand_group((mesh, 0, 1))
        with pytest.raises(ValueError, match=r"dim an int or a name"):
            aiocoll.expand_group((mesh, 0.5))
        return (
            aiocoll.expand_group((mesh, 0)),
            aiocoll.expand_group((mesh, "tp")),
            aiocoll.expand_group(mesh["tp"]),
            aiocoll.expand_group((mesh, 1), "mine"),
        )

    for rank, (d0, d1, sub, tagged) in enumerate(await run_ranks(body, world_size)):
        col, row = holding(mesh_groups(ranks, 0), rank), holding(mesh_groups(ranks, 1), rank)
        assert d0[1:] == (col, 2) and d0[0].startswith("mesh:")
        assert d1[1:] == (row, world_size // 2) and d1[0].startswith("mesh:") and d1[0] != d0[0]
        assert sub == d1  # the submesh's group is the mesh's group along that dim
        assert tagged == ("mine", row, world_size // 2)


# =============================================================================== registry
@pytest.mark.parametrize("world_size", SIZES)
async def test_same_tag_and_ranks_give_the_same_object_in_any_rank_order(world_size):
    async def body(rank):
        g = aiocoll.new_group([0, 2], tag="dp")
        assert aiocoll.new_group([2, 0], tag="dp") is g
        assert aiocoll.find_or_create_group([2, 0], tag="dp") is g
        assert aiocoll.find_group((2, 0), "dp") is g
        assert aiocoll.find_group(np.array([0, 2]), "dp") is g
        assert aiocoll.new_group([0, 2], tag="tp") is not g
        assert aiocoll.find_group([0, 2], "nope") is None
        return g.gid, g.ranks, g.rank

    results = await run_ranks(body, world_size)
    assert len({gid for gid, _, _ in results}) == 1  # every member derived the same id alone
    assert [r for _, ranks, r in results] == [0, -1, 1] + [-1] * (world_size - 3)
    assert all(ranks == (0, 2) for _, ranks, _ in results)


@pytest.mark.parametrize("world_size", SIZES)
async def test_untagged_groups_repeat_and_each_round_trips(world_size):
    members = list(range(1, world_size, 2))

    async def body(rank):
        a = aiocoll.new_group(members)
        b = aiocoll.new_group(reversed(members))
        assert a is not b and a.gid != b.gid
        for g in (a, b):
            tag, ranks, size = aiocoll.expand_group(g)
            assert aiocoll.find_group(ranks, tag) is g
            assert aiocoll.find_group(list(reversed(ranks)), tag) is g
            assert aiocoll.find_or_create_group(ranks, tag) is g
            assert size == len(members)
        assert aiocoll.find_group(members) is a  # an empty tag finds the first
        # the untagged tag names one group: other ranks with it find nothing
        assert aiocoll.find_group([0, 1], aiocoll.expand_group(a)[0]) is None
        return a.gid, b.gid

    results = await run_ranks(body, world_size)
    assert len(set(results)) == 1  # the k-th untagged group is the same on every member


@pytest.mark.parametrize("world_size", SIZES)
async def test_find_group_of_all_ranks_untagged_is_the_world(world_size):
    async def body(rank):
        aiocoll.new_group(range(world_size))  # an untagged twin does not hide the world
        assert aiocoll.find_group(range(world_size), "") is aiocoll.world()
        assert aiocoll.find_group(reversed(range(world_size))) is aiocoll.world()
        tag, ranks, _ = aiocoll.expand_group(aiocoll.world())
        assert aiocoll.find_group(ranks, tag) is aiocoll.world()
        assert aiocoll.find_group(range(world_size - 1)) is None

    await run_ranks(body, world_size)


async def test_find_or_create_with_an_empty_tag_raises():
    async def body(rank):
        with pytest.raises(ValueError, match="non-empty tag"):
            aiocoll.find_or_create_group([0, 1], "")
        with pytest.raises(ValueError, match="no untagged group 'nope'"):
            aiocoll.find_or_create_group([0, 1], "untagged:nope")

    await run_ranks(body, 4)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: aiocoll.new_group([0, 4]), ValueError, "rank 4 out of range for a world of size 4"),
        (lambda: aiocoll.new_group([1, 1]), ValueError, r"duplicate ranks \[1\]"),
        (lambda: aiocoll.new_group([]), ValueError, "at least one rank"),
        (lambda: aiocoll.new_group([0, "1"]), TypeError, "must be integers"),
        (lambda: aiocoll.new_group(3), TypeError, "sequence of integers"),
        (lambda: aiocoll.new_group([0], tag=1), TypeError, "tag must be a string"),
        (lambda: aiocoll.new_group([0], tag="untagged:x"), ValueError, "reserved"),
        (lambda: aiocoll.new_group([0, 1], name="world"), ValueError, "named 'world' already exists"),
        (lambda: aiocoll.find_group([0, 9]), ValueError, "out of range"),
    ],
    ids=["range", "dup", "empty", "str", "not-iterable", "tag-type", "reserved", "name-taken", "find-range"],
)
async def test_bad_ranks_tags_and_names_raise(call, err, match):
    async def body(rank):
        with pytest.raises(err, match=match):
            call()

    await run_ranks(body, 4)


async def test_a_tagged_group_cannot_be_renamed():
    async def body(rank):
        aiocoll.new_group([0, 1], tag="a", name="first")
        assert aiocoll.new_group([0, 1], tag="a", name="first") is aiocoll.new_group([1, 0], tag="a")
        with pytest.raises(ValueError, match="already exists named 'first', not 'second'"):
            aiocoll.new_group([0, 1], tag="a", name="second")

    await run_ranks(body, 2)


@pytest.mark.parametrize("world_size", SIZES)
@pytest.mark.parametrize("size", [1, 2, 4])
async def test_new_subgroups_are_contiguous(world_size, size):
    async def body(rank):
        mine, groups = aiocoll.new_subgroups(size)
        again_mine, again = aiocoll.new_subgroups(size)
        assert again_mine is not mine  # untagged: each call makes new groups
        tagged_mine, tagged = aiocoll.new_subgroups(size, tag="sub")
        assert aiocoll.new_subgroups(size, tag="sub") == (tagged_mine, tagged)
        total = await aiocoll.all_reduce(np.array([rank]), group=mine)
        return mine.ranks, [g.ranks for g in groups], int(total[0])

    want = [tuple(range(i, i + size)) for i in range(0, world_size, size)]
    for rank, (mine, groups, total) in enumerate(await run_ranks(body, world_size)):
        assert groups == want
        assert mine == want[rank // size]
        assert total == sum(want[rank // size])


async def test_new_subgroups_of_a_group():
    async def body(rank):
        mine, groups = aiocoll.new_subgroups(2, group=[1, 3, 5, 7])
        return None if mine is None else mine.ranks, [g.ranks for g in groups]

    for rank, (mine, groups) in enumerate(await run_ranks(body, 8)):
        assert groups == [(1, 3), (5, 7)]
        assert mine == (None if rank % 2 == 0 else ((1, 3) if rank < 4 else (5, 7)))


@pytest.mark.parametrize(
    "size, err, match",
    [
        (0, ValueError, "must be positive"),
        (3, ValueError, r"\(4\) must be divisible by group_size \(3\)"),
        (8, ValueError, "must not exceed the group size"),
        ("2", TypeError, "must be an int"),
    ],
)
async def test_new_subgroups_rejects_bad_sizes(size, err, match):
    async def body(rank):
        with pytest.raises(err, match=match):
            aiocoll.new_subgroups(size)

    await run_ranks(body, 4)


@pytest.mark.parametrize("world_size", SIZES)
async def test_making_groups_needs_no_world_wide_order_and_no_collective(world_size):
    half = world_size // 2

    async def body(rank):
        if rank == 0:  # groups only rank 0 makes: nothing waits on the other ranks
            for i in range(50):
                aiocoll.new_group([0], tag=f"solo{i}")
        tags = ["a", "b", "c"] if rank % 2 else ["c", "b", "a"]  # each rank its own order
        groups = {t: aiocoll.new_group(range(half) if rank < half else range(half, world_size), tag=t) for t in tags}
        out = {}
        for t in ("a", "b", "c"):
            out[t] = int((await aiocoll.all_reduce(np.array([rank + ord(t)]), group=groups[t]))[0])
        return out

    for rank, out in enumerate(await run_ranks(body, world_size)):
        members = range(half) if rank < half else range(half, world_size)
        assert out == {t: sum(members) + len(members) * ord(t) for t in "abc"}


@pytest.mark.parametrize("world_size", SIZES)
async def test_a_group_name_resolves_everywhere(world_size):
    async def body(rank):
        evens = aiocoll.new_group(range(0, world_size, 2), name="evens")
        odds = aiocoll.new_group(range(1, world_size, 2), tag="odd")
        name = "evens" if rank % 2 == 0 else odds.name
        total = await aiocoll.all_reduce(np.array([rank]), group=name)
        gathered = await aiocoll.all_gather(np.array([rank]), group=name)
        assert aiocoll.expand_group(name)[1] == list((evens if rank % 2 == 0 else odds).ranks)
        with pytest.raises(ValueError, match="no group named 'nobody'"):
            await aiocoll.all_reduce(np.array([rank]), group="nobody")
        return int(total[0]), gathered.tolist()

    for rank, (total, gathered) in enumerate(await run_ranks(body, world_size)):
        mine = list(range(rank % 2, world_size, 2))
        assert total == sum(mine) and gathered == mine


# =============================================================================== DeviceMesh
async def test_2x2_mesh_groups_match_the_spec():
    async def body(rank):
        mesh = aiocoll.DeviceMesh([[0, 1], [2, 3]], dim_names=("dp", "tp"))
        return mesh.get_group(0).ranks, mesh.get_group(1).ranks

    results = await run_ranks(body, 4)
    assert [d0 for d0, _ in results] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [d1 for _, d1 in results] == [(0, 1), (0, 1), (2, 3), (2, 3)]


@pytest.mark.parametrize("world_size", SIZES)
async def test_mesh_groups_local_ranks_sizes_and_coordinates(world_size):
    shape = (2, world_size // 2)
    ranks = np.arange(world_size).reshape(shape)

    async def body(rank):
        mesh = aiocoll.init_device_mesh(shape, ("dp", "tp"))
        assert mesh == aiocoll.DeviceMesh(ranks, mesh_dim_names=("dp", "tp"))
        assert mesh.ndim == 2 and mesh.shape == shape and mesh.mesh_dim_names == ("dp", "tp")
        np.testing.assert_array_equal(mesh.mesh, ranks)
        assert mesh.size() == world_size and mesh.size(0) == 2 and mesh.size("tp") == world_size // 2
        for dim, name in ((0, "dp"), (1, "tp"), (-1, "tp")):
            assert mesh.get_group(dim) is mesh.get_group(name)
            assert mesh.get_group(dim) is aiocoll.DeviceMesh(ranks, ("dp", "tp")).get_group(dim)  # any mesh object
        assert mesh.get_all_groups() == [mesh.get_group(0), mesh.get_group(1)]
        return (
            mesh.get_group("dp").ranks,
            mesh.get_group("tp").ranks,
            mesh.get_local_rank("dp"),
            mesh.get_local_rank(1),
            mesh.get_coordinate(),
            mesh.get_rank(),
        )

    for rank, (dp, tp, ldp, ltp, coord, grank) in enumerate(await run_ranks(body, world_size)):
        assert list(dp) == holding(mesh_groups(ranks, 0), rank)
        assert list(tp) == holding(mesh_groups(ranks, 1), rank)
        want = tuple(int(c) for c in np.argwhere(ranks == rank)[0])
        assert coord == want and (ldp, ltp) == want and grank == rank


@pytest.mark.parametrize("world_size", SIZES)
async def test_submesh_by_name_is_1d_and_shares_the_groups(world_size):
    ranks = np.arange(world_size).reshape(2, world_size // 2)

    async def body(rank):
        mesh = aiocoll.DeviceMesh(ranks, ("dp", "tp"))
        tp, dp = mesh["tp"], mesh["dp"]
        assert tp.ndim == 1 and tp.mesh_dim_names == ("tp",)
        assert tp.get_group() is mesh.get_group("tp") and dp.get_group() is mesh.get_group(0)
        assert tp.get_local_rank() == mesh.get_local_rank("tp")
        assert mesh["dp", "tp"] is mesh
        swapped = mesh["tp", "dp"]
        np.testing.assert_array_equal(swapped.mesh, ranks.T)
        assert swapped.get_group("dp") is mesh.get_group("dp")
        return tp.mesh.tolist(), dp.mesh.tolist(), tp.get_coordinate()

    for rank, (tp, dp, coord) in enumerate(await run_ranks(body, world_size)):
        assert tp == ranks[rank // (world_size // 2)].tolist()
        assert dp == ranks[:, rank % (world_size // 2)].tolist()
        assert coord == (tp.index(rank),)


async def test_3d_mesh_slicing_and_flattening():
    ranks = np.arange(8).reshape(2, 2, 2)

    async def body(rank):
        mesh = aiocoll.init_device_mesh((2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
        dp_cp = mesh["dp", "cp"]
        flat = dp_cp._flatten()  # torch's spelling; named "dp_cp"
        assert flat.mesh_dim_names == ("dp_cp",)
        assert mesh["dp_cp"].get_group() is flat.get_group() is mesh.get_group("dp_cp")
        assert aiocoll.expand_group((mesh, "dp_cp"))[1] == list(flat.get_group().ranks)
        named = mesh.flatten(("tp", "dp"), name="tp_dp")
        assert mesh.size("tp_dp") == 4
        whole = mesh.flatten()
        assert whole.mesh_dim_names == ("dp_cp_tp",) and whole.get_group().ranks == tuple(range(8))
        with pytest.raises(ValueError, match="already names"):
            mesh.flatten(("dp", "tp"), name="dp_cp")
        with pytest.raises(ValueError, match="given twice"):
            mesh.flatten(("dp", "dp"))
        total = await aiocoll.all_reduce(np.array([rank]), group=(mesh, "dp_cp"))
        return dp_cp.mesh.tolist(), flat.mesh.tolist(), named.mesh.tolist(), int(total[0])

    for rank, (dp_cp, flat, named, total) in enumerate(await run_ranks(body, 8)):
        t = rank % 2
        assert dp_cp == ranks[:, :, t].tolist()
        assert flat == ranks[:, :, t].reshape(-1).tolist()
        c = (rank // 2) % 2
        assert named == np.moveaxis(ranks[:, c, :], 1, 0).reshape(-1).tolist()  # tp major, then dp
        assert total == int(ranks[:, :, t].sum())


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: aiocoll.DeviceMesh([[0, 1], [2]]), ValueError, "rectangular"),
        (lambda: aiocoll.DeviceMesh([[0.0, 1.0]]), TypeError, "integer ranks, got dtype float64"),
        (lambda: aiocoll.DeviceMesh([[True, False]]), TypeError, "integer ranks"),
        (lambda: aiocoll.DeviceMesh([0, 0]), ValueError, r"distinct; repeated: \[0\]"),
        (lambda: aiocoll.DeviceMesh([0, 4]), ValueError, "rank 4 out of range"),
        (lambda: aiocoll.DeviceMesh(3), ValueError, "at least one dimension"),
        (lambda: aiocoll.DeviceMesh([]), ValueError, "at least one rank"),
        (lambda: aiocoll.DeviceMesh([[0, 1], [2, 3]], ("dp",)), ValueError, "1 names for a mesh of 2"),
        (lambda: aiocoll.DeviceMesh([0, 1], "dp"), TypeError, "sequence of strings"),
        (lambda: aiocoll.DeviceMesh([[0, 1], [2, 3]], ("a", "a")), ValueError, "distinct"),
        (lambda: aiocoll.DeviceMesh([0, 1], dim_names=("a",), mesh_dim_names=("a",)), TypeError, "not both"),
        (lambda: aiocoll.init_device_mesh((2, 3)), ValueError, r"\(2, 3\) has 6 ranks; the world has 4"),
        (lambda: aiocoll.init_device_mesh((2, 0)), ValueError, "positive"),
        (lambda: aiocoll.init_device_mesh("2x2"), TypeError, "mesh shape"),
    ],
)
async def test_bad_meshes_raise(make, err, match):
    async def body(rank):
        with pytest.raises(err, match=match):
            make()

    await run_ranks(body, 4)


async def test_bad_mesh_dims_raise():
    async def body(rank):
        mesh = aiocoll.DeviceMesh([[0, 1], [2, 3]], ("dp", "tp"))
        with pytest.raises(ValueError, match="2 dimensions: say which"):
            mesh.get_group()
        with pytest.raises(ValueError, match="dim 2 out of range for a 2-d mesh"):
            mesh.get_group(2)
        with pytest.raises(ValueError, match=r"no mesh dimension named 'pp'; this mesh knows \['dp', 'tp'\]"):
            mesh["pp"]
        with pytest.raises(TypeError, match="sliced by dimension names"):
            mesh[0]  # type: ignore[index]
        with pytest.raises(TypeError, match="int index or a str name"):
            mesh.get_local_rank(1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="2-d DeviceMesh"):
            await aiocoll.all_reduce(np.ones(1), group=mesh)
        unnamed = aiocoll.DeviceMesh([[0, 1], [2, 3]])
        with pytest.raises(ValueError, match="no mesh dimension named 'dp'"):
            unnamed["dp"]
        assert unnamed.flatten().mesh_dim_names is None

    await run_ranks(body, 4)


async def test_a_rank_outside_the_mesh_has_no_group_there():
    async def body(rank):
        mesh = aiocoll.DeviceMesh([[0, 1], [2, 3]])
        if rank < 4:
            return mesh.get_coordinate()
        assert mesh.get_coordinate() is None
        for get in (lambda: mesh.get_group(0), lambda: mesh.get_group(1), lambda: mesh.flatten().get_group()):
            with pytest.raises(ValueError, match=f"rank {rank} is not in the mesh"):
                get()
        with pytest.raises(ValueError, match="not in the mesh"):
            aiocoll.DeviceMesh([0, 1]).get_group()
        return None

    results = await run_ranks(body, 6)
    assert results == [(0, 0), (0, 1), (1, 0), (1, 1), None, None]


def test_device_mesh_works_without_torch():
    code = textwrap.dedent(
        """
        import asyncio, sys
        import numpy as np
        sys.modules["torch"] = None  # any import of torch now fails
        import aiocoll

        async def main():
            await aiocoll.init()
            mesh = aiocoll.init_device_mesh((1, 1), ("dp", "tp"))
            g = mesh.get_group("tp")
            y = await aiocoll.all_reduce(np.array([5]), group=(mesh, 0))
            print(g.ranks, mesh["dp"].mesh.tolist(), y.tolist())
            await aiocoll.destroy()

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(0,)", "[0]", "[5]"]


# =============================================================================== every collective, every form
def _form(name: str, rank: int, world_size: int) -> tuple[Any, list[int]]:
    """A group argument of kind ``name`` for ``rank`` and the reference members of its group."""
    half = world_size // 2
    ranks = np.arange(world_size).reshape(2, half)
    cols, rows = mesh_groups(ranks, 0), mesh_groups(ranks, 1)
    if name == "2d-list":  # columns, given as pairs
        return ranks.T.tolist(), holding(cols, rank)
    if name == "2d-list-strided":  # groups of 4 ranks with stride 2 (8 ranks) / 2 ranks (4 ranks)
        subs = [list(range(s, world_size, 2)) for s in (0, 1)]
        return subs, holding(subs, rank)
    mesh = aiocoll.DeviceMesh(ranks, ("dp", "tp"))
    if name == "mesh-dim":
        return (mesh, 0), holding(cols, rank)
    if name == "mesh-name":
        return (mesh, "tp"), holding(rows, rank)
    if name == "submesh":
        return mesh["dp"], holding(cols, rank)
    if name == "list":
        return holding(rows, rank), holding(rows, rank)
    if name == "group-name":
        g = aiocoll.new_group(holding(rows, rank), tag="rows")
        return g.name, list(g.ranks)
    if name == "process-group":
        g, _ = aiocoll.new_subgroups(half)
        assert g is not None
        return g, list(g.ranks)
    if name == "none":
        return None, list(range(world_size))
    raise AssertionError(name)


FORMS = [
    "2d-list", "2d-list-strided", "mesh-dim", "mesh-name", "submesh", "list", "group-name", "process-group", "none",
]


def _check(coll: str, members: list[int], rank: int, out: Any) -> None:
    """Assert ``out`` is what ``coll`` gives ``rank`` in the group ``members`` (sorted global ranks)."""
    n, me = len(members), members.index(rank)
    xs = [x_of(r) for r in members]
    if coll == "all_reduce":
        np.testing.assert_array_equal(out, sum(xs))
    elif coll == "all_gather":
        np.testing.assert_array_equal(out, np.concatenate(xs))
    elif coll == "reduce_scatter":
        full = sum(x_of(r, (n * 2, 3)) for r in members)
        np.testing.assert_array_equal(out, full[me * 2 : me * 2 + 2])
    elif coll == "all_to_all":
        np.testing.assert_array_equal(out, np.concatenate([x_of(r, (n * 2,))[me * 2 : me * 2 + 2] for r in members]))
    elif coll == "broadcast":
        np.testing.assert_array_equal(out, xs[-1])
    elif coll == "reduce":
        np.testing.assert_array_equal(out, sum(xs) if me == 0 else xs[me])
    elif coll == "gather":
        if me == n - 1:
            np.testing.assert_array_equal(out, np.concatenate(xs))
    elif coll == "scatter":
        np.testing.assert_array_equal(out, x_of(members[0], (n * 2, 3))[me * 2 : me * 2 + 2])
    elif coll == "barrier":
        assert out is None
    elif coll == "permute":  # member m sends to m + 1: this one got member m - 1's
        np.testing.assert_array_equal(out, xs[(me - 1) % n])
    elif coll == "send_recv":  # a ring of send/recv by group rank
        np.testing.assert_array_equal(out, xs[(me - 1) % n])
    elif coll == "all_reduce_coalesced":
        np.testing.assert_array_equal(out[0], sum(xs))
        np.testing.assert_array_equal(out[1], sum(x_of(r, (5,), np.float32) for r in members))
    else:
        raise AssertionError(coll)


async def _run(coll: str, group: Any, members: list[int], rank: int) -> Any:
    n, me = len(members), members.index(rank)
    x = x_of(rank)
    if coll == "all_reduce":
        return await aiocoll.all_reduce(x, group=group)
    if coll == "all_gather":
        return await aiocoll.all_gather(x, group=group)
    if coll == "reduce_scatter":
        return await aiocoll.reduce_scatter(x_of(rank, (n * 2, 3)), group=group)
    if coll == "all_to_all":
        return await aiocoll.all_to_all(x_of(rank, (n * 2,)), group=group)
    if coll == "broadcast":
        return await aiocoll.broadcast(x, n - 1, group=group)
    if coll == "reduce":
        return await aiocoll.reduce(x, 0, group=group)
    if coll == "gather":
        return await aiocoll.gather(x, n - 1, group=group)
    if coll == "scatter":
        return await aiocoll.scatter(x_of(rank, (n * 2, 3)), 0, group=group)
    if coll == "barrier":
        return await aiocoll.barrier(group=group)
    if coll == "permute":
        return await aiocoll.permute(x, [(m + 1) % n for m in range(n)], group=group)
    if coll == "send_recv":
        send = aiocoll.send(x, (me + 1) % n, group=group)
        recv = aiocoll.recv(x, (me - 1) % n, group=group)
        _, got = await asyncio.gather(send, recv)
        return got
    if coll == "all_reduce_coalesced":
        return await aiocoll.all_reduce_coalesced([x, x_of(rank, (5,), np.float32)], group=group)
    raise AssertionError(coll)


COLLECTIVES = [
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather",
    "scatter", "barrier", "permute", "send_recv", "all_reduce_coalesced",
]


@pytest.mark.parametrize("world_size", SIZES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("coll", COLLECTIVES)
async def test_every_collective_accepts_every_group_form(world_size, form, coll):
    async def body(rank):
        group, members = _form(form, rank, world_size)
        return members, await _run(coll, group, members, rank)

    for rank, (members, out) in enumerate(await run_ranks(body, world_size)):
        _check(coll, members, rank, out)


async def test_a_2d_list_must_hold_the_calling_rank():
    async def body(rank):
        if rank >= 4:
            with pytest.raises(ValueError, match=rf"rank {rank} is in none of the subgroups \[\[0, 1\], \[2, 3\]\]"):
                await aiocoll.all_reduce(np.ones(1), group=[[0, 1], [2, 3]])
        with pytest.raises(ValueError, match="group sizes must be identical"):
            await aiocoll.all_reduce(np.ones(1), group=[[0, 1], [2, 3, 4]])

    await run_ranks(body, 6)


async def test_permute_uses_group_local_ranks():
    # ranks 4..7 as a group: src_dst speaks of group ranks 0..3, not global ranks
    async def body(rank):
        if rank < 4:
            return None
        out = await aiocoll.permute(np.array([rank]), [2, 0, 3, 1], group=[4, 5, 6, 7])
        with pytest.raises(ValueError, match=r"permutation of range\(4\)"):
            await aiocoll.permute(np.array([rank]), [4, 5, 6, 7], group=[4, 5, 6, 7])
        return int(out[0])

    results = await run_ranks(body, 8)
    # group rank m's x goes to src_dst[m]: 4->6, 5->4, 6->7, 7->5
    assert results[4:] == [5, 7, 4, 6]


async def test_a_group_of_another_world_is_refused():
    leaked: list[Any] = []

    async def first(rank):
        leaked.append(aiocoll.new_group([0, 1]))

    await run_ranks(first, 2)

    async def second(rank):
        with pytest.raises(ValueError, match="belongs to another world"):
            await aiocoll.all_reduce(np.ones(1), group=leaked[rank])

    await run_ranks(second, 2)


# =============================================================================== overlapping subgroups
def _mesh_pair(rank: int, world_size: int) -> tuple[Any, Any]:
    mesh = aiocoll.DeviceMesh(np.arange(world_size).reshape(2, world_size // 2), ("dp", "tp"))
    return (mesh, "dp"), (mesh, "tp")


def _lists_pair(rank: int, world_size: int) -> tuple[Any, Any]:
    # [[0, 1], [2, 3], ...] and [[1, 2], [3, 4], ..., [W-1, 0]]: every rank is in one of each
    a = [[i, i + 1] for i in range(0, world_size, 2)]
    b = [[i, (i + 1) % world_size] for i in range(1, world_size, 2)]
    return a, b


def _untagged_twins(rank: int, world_size: int) -> tuple[Any, Any]:
    # two untagged groups of the same ranks: only the instance tells them apart
    return aiocoll.new_group(range(world_size)), aiocoll.new_group(range(world_size))


@pytest.mark.parametrize("world_size", SIZES)
@pytest.mark.parametrize("pair", [_mesh_pair, _lists_pair, _untagged_twins], ids=["mesh", "lists", "twins"])
@pytest.mark.parametrize("order", ["odd-ranks-reversed", "all-reversed", "same"])
async def test_collectives_on_subgroups_sharing_a_rank_interleave_freely(world_size, pair, order):
    async def body(rank):
        ga, gb = pair(rank, world_size)
        # different shapes and dtypes per group: a frame of one delivered to the other would raise
        a = aiocoll.all_reduce(np.full(3, rank, np.int64), group=ga)
        b = aiocoll.all_gather(np.full((2, 2), rank + 0.5, np.float32), group=gb)
        reverse = order == "all-reversed" or (order == "odd-ranks-reversed" and rank % 2)
        if reverse:
            got_b, got_a = await asyncio.gather(b, a)
        else:
            got_a, got_b = await asyncio.gather(a, b)
        return got_a, got_b, aiocoll.expand_group(ga)[1:], aiocoll.expand_group(gb)[1:]

    for rank, (got_a, got_b, (a_flat, a_size), (b_flat, b_size)) in enumerate(await run_ranks(body, world_size)):
        a_members = holding([sorted(a_flat[i : i + a_size]) for i in range(0, len(a_flat), a_size)], rank)
        b_members = holding([sorted(b_flat[i : i + b_size]) for i in range(0, len(b_flat), b_size)], rank)
        np.testing.assert_array_equal(got_a, np.full(3, sum(a_members)))
        np.testing.assert_array_equal(got_b, np.concatenate([np.full((2, 2), r + 0.5, np.float32) for r in b_members]))


@pytest.mark.parametrize("world_size", SIZES)
async def test_subgroup_collectives_as_tasks_awaited_in_opposite_orders(world_size):
    async def body(rank):
        mesh = aiocoll.init_device_mesh((2, world_size // 2), ("dp", "tp"))
        dims = ["dp", "tp"] if rank % 2 else ["tp", "dp"]
        tasks = {d: asyncio.ensure_future(aiocoll.all_reduce(np.array([rank]), group=(mesh, d))) for d in dims}
        out = {}
        for d in dims:  # awaited one after the other, in opposite orders on neighbours
            out[d] = int((await tasks[d])[0])
        return out

    ranks = np.arange(world_size).reshape(2, world_size // 2)
    for rank, out in enumerate(await run_ranks(body, world_size)):
        assert out == {
            "dp": sum(holding(mesh_groups(ranks, 0), rank)),
            "tp": sum(holding(mesh_groups(ranks, 1), rank)),
        }
