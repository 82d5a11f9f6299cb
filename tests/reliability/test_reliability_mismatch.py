"""Ranks calling different things at the same step all raise MismatchError naming both sides
(real processes, tcp and shm): different reduce op, dtype, element count, or collective —
including collectives that take the shared-memory fast path against ones that do not, which
exchange no frame a receiver could check. No rank gets a wrong result; the group is broken on
every member; other groups are unharmed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _reliability_harness import Job  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tests run on Linux")

ODD = 1
CASES = ["op", "dtype", "count", "all_gather", "broadcast", "gather", "barrier"]
TIMEOUT = 3.0
#: Members whose part of the odd call needs nothing from anyone may return before the mismatch
#: is seen (a gather leaf only sends); they get no result to be wrong, and their next call on
#: the group raises.
ONE_SIDED = {("gather", ODD)}


@pytest.mark.parametrize("transport, size", [("tcp", 3), ("shm", 4)])
def test_every_member_raises_mismatch_naming_both_sides(transport, size):
    with Job(size, "reliability_mismatch.py", str(ODD), ",".join(CASES), transport=transport,
             MISMATCH_TIMEOUT=str(TIMEOUT)) as job:
        codes = job.finish(120)
        assert codes == [0] * size, job.output()
        for r in job.ranks:
            results = {rec["case"]: rec for rec in r.records("RESULT")}
            after = {rec["case"]: rec for rec in r.records("AFTER")}
            assert sorted(results) == sorted(CASES), r.tail()
            for case in CASES:
                rec = results[case]
                if (case, r.rank) in ONE_SIDED and rec["outcome"] == "ok":
                    assert rec["value"] is None, rec
                else:
                    assert rec["outcome"] == "error" and rec["type"] == "MismatchError", (r.rank, rec)
                    assert ODD in rec["ranks"] and len(rec["ranks"]) == 2, (r.rank, rec)
                    other = [x for x in rec["ranks"] if x != ODD][0]
                    assert f"rank {ODD}" in rec["msg"] and f"rank {other}" in rec["msg"] or "here" in rec["msg"], rec
                    assert rec["elapsed"] < TIMEOUT, (r.rank, rec)
                nxt = after[case]
                assert nxt["outcome"] == "error", (r.rank, nxt)
                assert nxt["type"] in ("GroupBrokenError", "MismatchError", "RemoteAbortError"), (r.rank, nxt)
                assert nxt["elapsed"] < 0.5, (r.rank, nxt)
            assert r.records("WORLD") == [{"rank": r.rank, "outcome": "ok"}], r.tail()
