"""aiocoll.torch's groups by PyTorch's rules (test_functional_api.py's TestExpand and TestPgTag, as
our own tests): expanding every form, tags that always give the same group, untagged groups that
repeat and still round-trip, and collectives over each."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; the [test] set-up (.ci/run) installs the CPU build")

import aiocoll  # noqa: E402
import aiocoll.torch as ft  # noqa: E402
from aiocoll.testing import run_ranks  # noqa: E402


async def at_4(body):
    return await run_ranks(body, 4)


async def test_expand_rank_lists():
    async def body(rank):
        assert ft._expand_group([0, 1, 2, 3]) == ("", [0, 1, 2, 3], 4)
        assert ft._expand_group([0, 1, 2, 3], "bla")[0] == "bla"
        assert ft._expand_group([[0, 1], [2, 3]]) == ("", [0, 1, 2, 3], 2)
        assert ft._expand_group([[0, 1], [2, 3]], "blu")[0] == "blu"
        with pytest.raises(ValueError, match="group sizes must be identical"):
            ft._expand_group([[0], [1, 2, 3]])

    await at_4(body)


async def test_expand_process_groups_and_meshes():
    async def body(rank):
        world = aiocoll.world()
        tag, ranks, size = ft._expand_group(world)
        assert (ranks, size) == ([0, 1, 2, 3], 4) and aiocoll.find_group(ranks, tag) is world
        assert ft._expand_group(world, "bla")[0] == "bla"
        mine, _ = aiocoll.new_subgroups(2)
        tag, ranks, size = ft._expand_group(mine)
        assert ranks == list(mine.ranks) and size == 2 and aiocoll.find_group(ranks, tag) is mine
        solo = [aiocoll.new_group([i], tag="my_pg") for i in range(4)][rank]
        assert ft._expand_group(solo) == ("my_pg", [rank], 1)
        assert ft._expand_group(solo, "bla")[0] == "bla"
        mesh = aiocoll.DeviceMesh(np.arange(4))
        assert ft._expand_group(mesh)[1:] == ([0, 1, 2, 3], 4)
        mesh2 = aiocoll.DeviceMesh(np.arange(4).reshape(2, 2))
        with pytest.raises(ValueError, match=r"pass \(mesh, dim\)"):
            ft._expand_group(mesh2)
        assert ft._expand_group((mesh2, 0))[1:] == ([0, 2] if rank in (0, 2) else [1, 3], 2)
        assert ft._expand_group((mesh2, 1))[1:] == ([0, 1] if rank in (0, 1) else [2, 3], 2)

    await at_4(body)


async def test_tags_give_the_same_group_and_untagged_groups_repeat():
    async def body(rank):
        g1, _ = aiocoll.new_subgroups(2, tag="blu")
        g2, _ = aiocoll.new_subgroups(2, tag="blu")
        g3, _ = aiocoll.new_subgroups(2, tag="blu2")
        g4, _ = aiocoll.new_subgroups(2)
        g5, _ = aiocoll.new_subgroups(2)
        assert g1 is g2 and g1 is not g3 and g4 is not g1 and g4 is not g5
        # every one round-trips through expand + find, untagged ones too
        for g in (g1, g3, g4, g5):
            tag, ranks, _ = ft._expand_group(g)
            assert aiocoll.find_group(ranks, tag) is g
        # a tag passed with a group names the tagged group of those ranks; a group's own tag stays
        tag, ranks, _ = ft._expand_group(g3, "blu")
        assert aiocoll.find_group(ranks, tag) is g1
        tag, ranks, _ = ft._expand_group(g4, "blu")
        assert aiocoll.find_group(ranks, tag) is g1
        tag, ranks, _ = ft._expand_group(g1, "")
        assert aiocoll.find_group(ranks, tag) is g1
        assert aiocoll.find_or_create_group([0, 1, 2, 3][2 * (rank // 2): 2 * (rank // 2) + 2], "blu") is g1
        assert aiocoll.find_group([0, 1, 2, 3], "") is aiocoll.world()
        # the collectives see the same groups: each is a separate sequence of steps
        outs = [int(await ft.wait_async(ft.all_reduce(torch.tensor([1 << rank]), "sum", g))) for g in (g1, g3, g4, g5)]
        tagged = int(await ft.wait_async(ft.all_reduce(torch.tensor([1 << rank]), "sum", [[0, 1], [2, 3]], "blu")))
        return outs, tagged

    for rank, (outs, tagged) in enumerate(await at_4(body)):
        pair = (1 << (rank - rank % 2)) | (1 << (rank - rank % 2 + 1))
        assert outs == [pair] * 4 and tagged == pair
