"""Cases of our own, on torch.distributed's test bases, for the places where aiocoll fell short of
PyTorch's test_functional_api.py: torch process groups, group names and DeviceMeshes given to the
functional collectives, torch's tags, torch's funcol reduce_scatter (the backend's coalesced
reduce-scatter), meta tensors before init, and the backend's monitored_barrier, coalescing
managers and receive-from-any-source. Run by torch_funcol_harness.py, which makes ``ft_c`` torch's
functional collectives or ``aiocoll.torch``; expected values are computed here from the ranks.
"""

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as ft_c
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh as TorchMesh
from torch.testing._internal.common_distributed import MultiThreadedTestCase
from torch.testing._internal.common_utils import TestCase


def data(rank: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Rank ``rank``'s random integers (as float64, exact under sums), the same on every process."""
    rng = np.random.default_rng(1000 * seed + rank)
    return torch.from_numpy(rng.integers(-50, 50, size=shape).astype(np.float64))


class TorchGroupForms(MultiThreadedTestCase):
    @property
    def world_size(self):
        return 4

    def test_mesh_1d_mesh_dim_and_group_name(self):
        r, w = dist.get_rank(), self.world_size
        xs = [data(p, (3, 4)) for p in range(w)]
        mesh = TorchMesh("cpu", torch.arange(w))
        got = ft_c.all_reduce(xs[r], "sum", mesh)
        self.assertEqual(torch.as_tensor(got), sum(xs))
        got = ft_c.all_reduce(xs[r], "max", dist.group.WORLD.group_name)
        self.assertEqual(torch.as_tensor(got), torch.stack(xs).amax(0))
        mesh2 = TorchMesh("cpu", torch.arange(w).view(2, 2))
        col = [p for p in range(w) if p % 2 == r % 2]  # dim 0 of [[0, 1], [2, 3]]
        row = [p for p in range(w) if p // 2 == r // 2]  # dim 1
        got = ft_c.all_gather_tensor(xs[r], 1, (mesh2, 0))
        self.assertEqual(torch.as_tensor(got), torch.cat([xs[p] for p in col], 1))
        got = ft_c.reduce_scatter_tensor(xs[r], "sum", 1, (mesh2, 1))
        self.assertEqual(torch.as_tensor(got), sum(xs[p] for p in row).chunk(2, 1)[row.index(r)])
        got = ft_c.broadcast(xs[r], 1, mesh2.get_group(1))
        self.assertEqual(torch.as_tensor(got), xs[row[1]])

    def test_expand_group_reports_torch_tags(self):
        r = dist.get_rank()
        tag, ranks, size = ft_c._expand_group(dist.group.WORLD)
        self.assertEqual((tag, ranks, size), (c10d._get_group_tag(dist.group.WORLD), [0, 1, 2, 3], 4))
        halves = [c10d._new_group_with_tag([0, 1]), c10d._new_group_with_tag([2, 3])]
        tagged = [c10d._new_group_with_tag([0, 1], pg_tag="t"), c10d._new_group_with_tag([2, 3], pg_tag="t")]
        for pg in (halves[r // 2], tagged[r // 2]):
            tag, ranks, _ = ft_c._expand_group(pg)
            self.assertIs(c10d._find_pg_by_ranks_and_tag(tag, ranks), pg)
        mesh2 = TorchMesh("cpu", torch.arange(4).view(2, 2))
        with self.assertRaisesRegex(AssertionError, "Only 1D mesh"):
            ft_c._expand_group(mesh2)
        self.assertEqual(ft_c._expand_group((mesh2, 1))[1:], ([0, 1] if r < 2 else [2, 3], 2))

    def test_reduce_scatter_and_coalesced(self):
        r, w = dist.get_rank(), self.world_size
        xs = [data(p, (2 * w, w), seed=1) for p in range(w)]
        ys = [data(p, (w, 3), seed=2).to(torch.int64) for p in range(w)]
        for dim in (0, 1):
            got = ft_c.reduce_scatter_tensor(xs[r], "sum", dim, dist.group.WORLD)
            self.assertEqual(torch.as_tensor(got), sum(xs).chunk(w, dim)[r])
        a, b = ft_c.reduce_scatter_tensor_coalesced([xs[r], ys[r]], "sum", [0, 0], dist.group.WORLD)
        self.assertEqual(torch.as_tensor(a), sum(xs).chunk(w, 0)[r])
        self.assertEqual(torch.as_tensor(b), sum(ys).chunk(w, 0)[r])


class TorchBackendExtras(MultiThreadedTestCase):
    @property
    def world_size(self):
        return 2

    def test_coalescing_managers(self):
        r, w = dist.get_rank(), self.world_size
        xs = [[data(p, (5,), seed=s) for p in range(w)] for s in range(3)]
        # gloo coalesces only without a device (through allreduce_coalesced); aiocoll both ways
        devices = [None] + ([torch.device("cpu")] if dist.get_backend() == "aiocoll" else [])
        for device in devices:
            mine = [x[r].clone() for x in xs]
            with dist._coalescing_manager(device=device, async_ops=True) as cm:
                for t in mine:
                    dist.all_reduce(t)
            cm.wait()
            for t, x in zip(mine, xs):
                self.assertEqual(t, sum(x))
        peer = 1 - r
        out = torch.empty(5, dtype=torch.float64)
        ops = [dist.P2POp(dist.isend, xs[0][r], peer), dist.P2POp(dist.irecv, out, peer)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        self.assertEqual(out, xs[0][peer])

    def test_monitored_barrier_and_recv_anysource(self):
        r = dist.get_rank()
        dist.group.WORLD.monitored_barrier(timedelta(seconds=60))
        x = data(1, (4,), seed=3)
        if r == 1:
            dist.send(x, 0)
        else:
            got = torch.empty(4, dtype=torch.float64)
            if dist.get_backend() == "aiocoll":
                with self.assertRaisesRegex(ValueError, "any source.*src="):
                    dist.recv(got)
                dist.recv(got, src=1)
            else:
                self.assertEqual(dist.recv(got), 1)
            self.assertEqual(got, x)


class MetaBeforeInit(TestCase):
    def test_shapes_without_a_group(self):
        x = torch.empty((2, 3, 4), device="meta")
        self.assertEqual(ft_c.all_reduce(x, "sum", "0").shape, x.shape)
        if ft_c.__name__ == "aiocoll.torch":  # torch's needs an initialised group for a rank list
            self.assertEqual(ft_c.all_gather_tensor(x, 1, [0, 1, 2]).shape, (2, 9, 4))
