"""Run unittest classes written on torch.distributed's test bases as one process per rank, on a
chosen backend, with torch's functional collectives or ``aiocoll.torch`` as the module the tests
call ``ft_c``.

    python torch_funcol_harness.py FILE --backend aiocoll --funcol aiocoll --out results.json

FILE is PyTorch's ``test/distributed/test_functional_api.py`` (of the torch in use; it is not
part of this repository) or tests/scripts/torch_funcol_cases.py (ours, on the same bases).

The adaptation, the same for every backend and both funcol modules:
- ``MultiThreadedTestCase`` classes: ``world_size`` processes; each initialises the backend's
  default group (a file store), runs the test method, destroys the group.
- ``MultiProcessTestCase`` classes (``DistributedTestBase``): ``world_size`` processes; their
  ``create_pg`` initialises the backend under test; the device is "cpu".
- ``instantiate_device_type_tests`` keeps the generic class, so that classes written for an
  accelerator run on the CPU.
- other ``TestCase`` classes: one process each, as they are.
A test passes when it passes on every rank; it is skipped when rank 0 skipped it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
import unittest
from datetime import timedelta
from typing import Any

# A rank that failed leaves its peers waiting in a collective: they give up after this.
PG_TIMEOUT_S = float(os.environ.get("FUNCOL_HARNESS_PG_TIMEOUT", "30"))


def _load(path: str, funcol: str) -> types.ModuleType:
    import torch.testing._internal.common_device_type as cdt

    kept: list[type] = []

    def keep_generic(cls: type, scope: dict[str, Any], **_: Any) -> None:
        kept.append(cls)  # left in scope, device-independent: run with device "cpu"

    cdt.instantiate_device_type_tests = keep_generic  # type: ignore[assignment]
    import aiocoll.torch  # noqa: F401  (registers the "aiocoll" backend)

    spec = importlib.util.spec_from_file_location("funcol_tests_under_harness", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    if hasattr(mod, "DEVICE"):
        mod.DEVICE = "cpu"
    if funcol == "aiocoll":
        import aiocoll.torch as ft

        mod.ft_c = ft  # "change one import"
    return mod


def _kind(cls: type) -> str:
    from torch.testing._internal.common_distributed import MultiProcessTestCase, MultiThreadedTestCase

    if issubclass(cls, MultiThreadedTestCase):
        return "threads"
    if issubclass(cls, MultiProcessTestCase):
        return "processes"
    return "single"


def _tests(mod: types.ModuleType) -> list[tuple[str, str, int]]:
    """(class, method, world size) of every test, where world size 1 means one plain process."""
    out = []
    for name, cls in sorted(vars(mod).items()):
        if not isinstance(cls, type) or not issubclass(cls, unittest.TestCase) or cls.__module__ != mod.__name__:
            continue
        methods = sorted(m for m in dir(cls) if m.startswith("test") and callable(getattr(cls, m)))
        if not methods:
            continue
        kind = _kind(cls)
        ws = 1 if kind == "single" else int(cls.world_size.fget(object.__new__(cls)))  # type: ignore[attr-defined]
        for m in methods:
            out.append((name, m, ws))
    return out


# --------------------------------------------------------------------------- in a rank
def _instance(cls: type, method: str, rank: int) -> unittest.TestCase:
    inst = cls(method)
    # The bases wrap the method to spawn threads/processes and join them; run the plain one.
    setattr(inst, method, types.MethodType(getattr(cls, method), inst))
    inst.rank = rank  # type: ignore[attr-defined]
    return inst


def _status(result: unittest.TestResult) -> tuple[str, str]:
    if result.errors or result.failures:
        return "fail", "\n".join(tb for _, tb in result.errors + result.failures)[-3000:]
    if result.skipped:
        return "skip", result.skipped[0][1]
    if result.expectedFailures:
        return "xfail", ""
    return "pass", ""


def _run_rank(mod: types.ModuleType, tests: list[str], rank: int, ws: int, backend: str, workdir: str) -> dict[str, Any]:
    import torch.distributed as dist

    results: dict[str, Any] = {}
    for i, test_id in enumerate(tests):
        cls_name, method = test_id.split(".")
        cls = getattr(mod, cls_name)
        kind = _kind(cls)
        store_file = os.path.join(workdir, f"store-{i}")
        t0 = time.monotonic()
        try:
            inst = _instance(cls, method, rank) if kind != "single" else cls(method)

            def init(device: Any = None, world_size: int | None = None) -> Any:
                dist.init_process_group(
                    backend, rank=rank, world_size=world_size or ws,
                    store=dist.FileStore(store_file, world_size or ws), timeout=timedelta(seconds=PG_TIMEOUT_S),
                )
                return dist.distributed_c10d._get_default_group()

            if kind == "threads":
                inst.setUp = lambda: None  # type: ignore[method-assign]
                inst.tearDown = lambda: None  # type: ignore[method-assign]
                init()
            elif kind == "processes":
                inst.setUp = lambda: None  # type: ignore[method-assign]
                inst.tearDown = lambda: None  # type: ignore[method-assign]
                inst.file_name = store_file  # type: ignore[attr-defined]
                inst.create_pg = init  # type: ignore[attr-defined]
            result = unittest.TestResult()
            inst.run(result)
            status, detail = _status(result)
        except BaseException:  # noqa: BLE001 - reported as the test's failure
            status, detail = "fail", traceback.format_exc()[-3000:]
        finally:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001
                    pass
        results[test_id] = {"status": status, "detail": detail, "seconds": round(time.monotonic() - t0, 2)}
    return results


# --------------------------------------------------------------------------- the parent
def _merge(per_rank: list[dict[str, Any]], tests: list[str]) -> dict[str, Any]:
    out = {}
    for t in tests:
        got = [r.get(t, {"status": "fail", "detail": "rank did not report (crashed or timed out)"}) for r in per_rank]
        fails = [f"rank {i}: {g['detail']}" for i, g in enumerate(got) if g["status"] == "fail"]
        if fails:
            out[t] = {"status": "fail", "detail": "\n".join(fails)[-4000:]}
        else:
            out[t] = {"status": got[0]["status"], "detail": got[0]["detail"]}
    return out


def _batch(args: argparse.Namespace, tests: list[str], ws: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="funcol-harness-") as d:
        procs = []
        for r in range(ws):
            cmd = [sys.executable, __file__, args.file, "--backend", args.backend, "--funcol", args.funcol,
                   "--child", str(r), "--world-size", str(ws), "--dir", d, "--tests", ",".join(tests)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                logs.append(p.communicate()[0])
        per_rank = []
        for r in range(ws):
            path = os.path.join(d, f"rank{r}.json")
            per_rank.append(json.load(open(path)) if os.path.exists(path) else {})
        merged = _merge(per_rank, tests)
        for t, v in merged.items():
            if v["status"] == "fail" and "did not report" in v["detail"]:
                v["detail"] += "\n" + "\n".join(log[-2000:] for log in logs)
        return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--backend", default="aiocoll")
    ap.add_argument("--funcol", choices=("torch", "aiocoll"), default="torch")
    ap.add_argument("--out")
    ap.add_argument("-k", dest="select", default="", help="run tests whose id contains this")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--child", type=int, default=-1)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--dir")
    ap.add_argument("--tests")
    args = ap.parse_args()
    mod = _load(args.file, args.funcol)
    if args.child >= 0:
        res = _run_rank(mod, args.tests.split(","), args.child, args.world_size, args.backend, args.dir)
        with open(os.path.join(args.dir, f"rank{args.child}.json"), "w") as f:
            json.dump(res, f)
        os._exit(0)  # no interpreter shutdown: a backend's threads must not hang the exit
    batches: dict[int, list[str]] = {}
    singles: list[str] = []
    for cls, m, ws in _tests(mod):
        tid = f"{cls}.{m}"
        if args.select and args.select not in tid:
            continue
        (singles.append(tid) if ws == 1 else batches.setdefault(ws, []).append(tid))
    results: dict[str, Any] = {}
    for ws, tests in sorted(batches.items()):
        results.update(_batch(args, tests, ws, args.timeout))
    for tid in singles:  # each its own process: these may initialise a group and keep it
        results.update(_batch(args, [tid], 1, args.timeout))
    text = json.dumps(results, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    counts: dict[str, int] = {}
    for v in results.values():
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    for t, v in sorted(results.items()):
        print(f"{v['status']:5} {t}")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
