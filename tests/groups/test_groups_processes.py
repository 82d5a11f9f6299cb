"""Groups across real processes: four ranks over the TCP store and transport.

Each process derives group ids on its own; this checks that they agree across processes (no
shared memory to hide a mistake), that every group form works, and that collectives on
subgroups sharing a rank interleave freely.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
WORLD = 4
BASELINE_FAILED = 3  # a rank's plain world all_reduces failed or gave wrong sums: not a group problem

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    import aiocoll

    async def main():
        rank, world_size, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        await aiocoll.init(rank=rank, world_size=world_size, store=f"tcp://127.0.0.1:{port}",
                           transport="tcp", secret="groups-test", timeout=60)
        # Baseline, no group code: world all_reduces must arrive, with the right values.
        try:
            for i in range(50):
                got = int((await aiocoll.all_reduce(np.array([rank + i])))[0])
                want = sum(range(world_size)) + world_size * i
                if got != want:
                    raise AssertionError(f"world all_reduce #{i} gave {got}, want {want}")
        except Exception as exc:  # the transport itself does not work: say so, apart
            print(f"BASELINE-FAILED on rank {rank}: {type(exc).__name__}: {exc}", flush=True)
            await aiocoll.destroy(abort=True)
            sys.exit(3)
        out = {}
        mesh = aiocoll.DeviceMesh([[0, 1], [2, 3]], dim_names=("dp", "tp"))
        a = aiocoll.all_reduce(np.full(3, rank, np.int64), group=(mesh, "dp"))
        b = aiocoll.all_gather(np.full((2,), rank + 0.5, np.float32), group=(mesh, 1))
        if rank % 2:  # odd ranks await the other order
            got_b, got_a = await asyncio.gather(b, a)
        else:
            got_a, got_b = await asyncio.gather(a, b)
        out["mesh_dp"], out["mesh_tp"] = got_a.tolist(), got_b.tolist()
        out["list2d"] = (await aiocoll.all_reduce(np.array([rank]), group=[[0, 3], [1, 2]])).tolist()
        out["submesh"] = (await aiocoll.all_gather(np.array([rank]), group=mesh["tp"])).tolist()
        out["permute"] = (await aiocoll.permute(np.array([rank]), [1, 0], group=(mesh, "dp"))).tolist()
        mine, _ = aiocoll.new_subgroups(2)
        out["subgroups"] = (await aiocoll.all_gather(np.array([rank]), group=mine)).tolist()
        # tagged groups made in a different order on each rank
        tags = ["x", "y"] if rank % 2 else ["y", "x"]
        groups = {t: aiocoll.new_group(range(world_size), tag=t) for t in tags}
        out["tagged"] = [(await aiocoll.all_reduce(np.array([rank]), group=groups[t])).tolist() for t in "xy"]
        # untagged twins: ids derived alone must agree across processes, and round-trip
        twins = [aiocoll.new_group([0, 1, 2, 3]), aiocoll.new_group([3, 2, 1, 0])]
        out["roundtrip"] = []
        for g in twins:
            tag, ranks, _ = aiocoll.expand_group(g)
            out["roundtrip"].append(aiocoll.find_group(ranks, tag) is g)
        out["gids"] = [g.gid for g in twins] + [mesh.get_group(d).gid for d in (0, 1)]
        t0 = aiocoll.all_reduce(np.array([rank]), group=twins[0])
        t1 = aiocoll.all_reduce(np.array([2 * rank]), group=twins[1])
        if rank % 2:
            r1, r0 = await asyncio.gather(t1, t0)
        else:
            r0, r1 = await asyncio.gather(t0, t1)
        out["twins"] = [r0.tolist(), r1.tolist()]
        print("RESULT " + json.dumps(out), flush=True)
        await aiocoll.destroy()

    asyncio.run(main())
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    script = tmp_path / "groups_rank.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.pop("AIOCOLL_SECRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(WORLD), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        for r in range(WORLD)
    ]
    results = []
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def test_groups_meshes_and_tags_across_four_processes(tmp_path):
    runs = _launch(tmp_path)
    if any(r.returncode == BASELINE_FAILED for r in runs):
        lines = [line for r in runs for line in r.stdout.splitlines() if line.startswith("BASELINE-FAILED")]
        # the root cause first: a wrong sum, else a rank that did not just lose a peer that quit
        why = min(lines, key=lambda line: (" gave " not in line, " was lost " in line))
        # the transport is fixed; a baseline failure now is a real regression, not a reason to skip
        pytest.fail(f"plain world all_reduces over the tcp transport failed between processes (no group code): {why}")
    for rank, r in enumerate(runs):
        assert r.returncode == 0, f"rank {rank}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    outs: list[dict[str, Any]] = [
        json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:]) for r in runs
    ]
    ranks = np.array([[0, 1], [2, 3]])
    for rank, out in enumerate(outs):
        row, col = ranks[rank // 2], ranks[:, rank % 2]
        assert out["mesh_dp"] == [int(col.sum())] * 3
        assert out["mesh_tp"] == np.repeat(row + 0.5, 2).tolist()
        assert out["list2d"] == [3]  # {0, 3} and {1, 2} both sum to 3
        assert out["submesh"] == row.tolist()
        assert out["permute"] == [int(col[1 - list(col).index(rank)])]
        assert out["subgroups"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert out["tagged"] == [[6], [6]]
        assert out["roundtrip"] == [True, True]
        assert out["twins"] == [[6], [12]]
    assert len({tuple(o["gids"][:2]) for o in outs}) == 1  # untagged ids agree across processes
    assert len(set(outs[0]["gids"][:2])) == 2
    for d in (2, 3):  # each mesh group's id is agreed by its members (and differs from the other's)
        by_group: dict[int, set[int]] = {}
        for rank, o in enumerate(outs):
            by_group.setdefault(o["gids"][d], set()).add(rank)
        assert sorted(map(sorted, by_group.values())) == ([[0, 2], [1, 3]] if d == 2 else [[0, 1], [2, 3]])
