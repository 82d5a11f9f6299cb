"""`aiocoll run` and the launcher behind it, driven with throwaway scripts (no collectives)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("aiocoll") is None:
    # --import-mode=importlib leaves sys.path alone; without an editable install, test the tree
    # this file sits in (the same one the subprocess tests run from).
    sys.path.insert(0, str(REPO))

from aiocoll.launch import cli as _cli  # noqa: E402
from aiocoll.launch.cli import _split_run_argv, main  # noqa: E402
from aiocoll.launch.launcher import (  # noqa: E402
    LaunchInfo,
    launch,
    register_cleanup,
    unregister_cleanup,
)

LINE = re.compile(r"^\[(\d+)\] (.*)$")


def write_script(tmp_path: Path, body: str, name: str = "rank.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def by_rank(text: str) -> dict[int, list[str]]:
    """Group prefixed lines by rank; any unprefixed line fails the test."""
    lines: dict[int, list[str]] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"line without a rank prefix: {line!r}"
        lines.setdefault(int(match[1]), []).append(match[2])
    return lines


def json_by_rank(text: str) -> dict[int, Any]:
    return {rank: json.loads(lines[-1]) for rank, lines in by_rank(text).items()}


def alive(pid: int) -> bool:
    """Running or stopped; a zombie waiting for init to reap it counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def assert_all_dead(pids: list[int]) -> None:
    # SIGKILL is asynchronous: give the kernel a moment to finish a process it was sent to.
    deadline = time.monotonic() + 2.0
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p for p in pids if alive(p)] == []


def printed_pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"pid=(\d+)", text)]


@pytest.fixture
def hook_calls() -> Iterator[list[LaunchInfo]]:
    calls: list[LaunchInfo] = []

    def hook(info: LaunchInfo) -> None:
        calls.append(info)

    register_cleanup(hook)
    try:
        yield calls
    finally:
        unregister_cleanup(hook)


ENV_SCRIPT = """
    import json, os
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "AIOCOLL_SECRET", "AIOCOLL_JOB_ID", "AIOCOLL_TRANSPORT", "AIOCOLL_TIMEOUT",
            "PYTHONUNBUFFERED"]
    print(json.dumps({k: os.environ.get(k) for k in keys}))
"""


# -- environment ----------------------------------------------------------------------------


def test_each_rank_sees_the_torchrun_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOCOLL_SECRET", raising=False)
    script = write_script(tmp_path, ENV_SCRIPT)
    assert main(["run", "-n", "3", "--transport", "tcp", "--timeout", "7.5", script]) == 0
    envs = json_by_rank(capsys.readouterr().out)
    assert sorted(envs) == [0, 1, 2]
    for rank, env in envs.items():
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "3"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["AIOCOLL_TRANSPORT"] == "tcp"
        assert float(env["AIOCOLL_TIMEOUT"]) == 7.5
        assert env["PYTHONUNBUFFERED"] == "1"
    shared = {
        key: {env[key] for env in envs.values()}
        for key in ("MASTER_PORT", "AIOCOLL_SECRET", "AIOCOLL_JOB_ID")
    }
    assert all(len(values) == 1 for values in shared.values()), shared
    (port,) = shared["MASTER_PORT"]
    assert 0 < int(port) < 65536
    (secret,) = shared["AIOCOLL_SECRET"]
    assert secret


def test_each_job_gets_a_fresh_secret_and_job_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOCOLL_SECRET", raising=False)
    script = write_script(tmp_path, ENV_SCRIPT)
    seen = []
    for _ in range(2):
        assert main(["run", "-n", "1", script]) == 0
        env = json_by_rank(capsys.readouterr().out)[0]
        seen.append((env["AIOCOLL_SECRET"], env["AIOCOLL_JOB_ID"]))
    assert seen[0][0] != seen[1][0]
    assert seen[0][1] != seen[1][1]


def test_secret_already_in_the_environment_is_passed_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOCOLL_SECRET", "team-secret")
    script = write_script(tmp_path, ENV_SCRIPT)
    assert main(["run", "-n", "2", script]) == 0
    envs = json_by_rank(capsys.readouterr().out)
    assert [env["AIOCOLL_SECRET"] for env in envs.values()] == ["team-secret"] * 2


def test_ranks_import_the_launchers_aiocoll(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The script's directory, not the source tree, is on a rank's sys.path.
    script = write_script(tmp_path, "import aiocoll; print(aiocoll.__file__)")
    assert main(["run", "-n", "1", script]) == 0
    import aiocoll

    assert by_rank(capsys.readouterr().out)[0] == [aiocoll.__file__]


# -- output ---------------------------------------------------------------------------------


def test_output_is_relayed_as_whole_lines_prefixed_by_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each line is written in three flushed pieces, so unbuffered ranks interleave mid-line
    # unless the launcher reassembles lines.
    script = write_script(
        tmp_path,
        """
        import os, sys
        r = os.environ["RANK"]
        for i in range(200):
            for piece in (f"rank {r} ", f"line {i} ", "x" * 50 + "\\n"):
                sys.stdout.write(piece)
                sys.stdout.flush()
            if i % 50 == 0:
                print(f"rank {r} err {i}", file=sys.stderr, flush=True)
        sys.stdout.write(f"rank {r} no newline at the end")
        """,
    )
    assert main(["run", "-n", "3", script]) == 0
    captured = capsys.readouterr()
    out = by_rank(captured.out)
    assert sorted(out) == [0, 1, 2]
    for rank, lines in out.items():
        expected = [f"rank {rank} line {i} " + "x" * 50 for i in range(200)]
        assert lines == [*expected, f"rank {rank} no newline at the end"]
    err = by_rank(captured.err)
    for rank in range(3):
        assert err[rank] == [f"rank {rank} err {i}" for i in (0, 50, 100, 150)]


# -- failure --------------------------------------------------------------------------------


def test_failing_rank_stops_a_sleeping_peer_and_sets_the_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(
        tmp_path,
        """
        import os, sys, time
        print(f"pid={os.getpid()}", flush=True)
        if os.environ["RANK"] == "1":
            time.sleep(0.3)
            sys.exit(3)
        time.sleep(60)
        """,
    )
    start = time.monotonic()
    assert main(["run", "-n", "2", script]) == 3
    assert time.monotonic() - start < 10
    captured = capsys.readouterr()
    assert "aiocoll run: rank 1 failed with exit code 3; stopped rank 0" in captured.err
    assert_all_dead(printed_pids(captured.out))


async def test_peer_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = write_script(
        tmp_path,
        f"""
        import os, signal, sys, time
        if os.environ["RANK"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        while not os.path.exists({str(ready)!r}):
            time.sleep(0.01)
        sys.exit(1)
        """,
    )
    out, err = io.BytesIO(), io.BytesIO()
    start = time.monotonic()
    result = await launch(
        [script], 2, transport=None, timeout=None, grace=0.5, stdout=out, stderr=err
    )
    assert time.monotonic() - start < 10
    assert result.exit_code == 1
    assert result.failed_rank == 1
    assert result.returncodes == (-signal.SIGKILL, 1)
    assert result.message is not None
    assert "killed rank 0 after 0.5 s grace" in result.message
    assert result.message.encode() in err.getvalue()


def test_rank_killed_by_a_signal_is_reported_with_the_signal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(
        tmp_path,
        """
        import os, signal, time
        if os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        """,
    )
    assert main(["run", "-n", "2", script]) == 128 + signal.SIGKILL
    assert "rank 0 failed with signal 9 (SIGKILL)" in capsys.readouterr().err


# -- command line ---------------------------------------------------------------------------


def test_module_mode_runs_the_module_with_its_args(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_script(
        tmp_path,
        "import json, sys; print(json.dumps([__name__, sys.argv[1:]]))",
        name="launcher_probe_module.py",
    )
    monkeypatch.chdir(tmp_path)  # `python -m` looks in the working directory
    assert main(["run", "-n", "2", "-m", "launcher_probe_module", "--foo", "-n", "9"]) == 0
    assert json_by_rank(capsys.readouterr().out) == {
        0: ["__main__", ["--foo", "-n", "9"]],
        1: ["__main__", ["--foo", "-n", "9"]],
    }


def test_script_args_pass_through_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(tmp_path, "import json, sys; print(json.dumps(sys.argv[1:]))")
    args = ["--foo", "-n", "5", "--timeout", "1", "--", "-m", "x", "plain"]
    assert main(["run", "-n", "2", "--timeout", "3", script, *args]) == 0
    assert json_by_rank(capsys.readouterr().out) == {0: args, 1: args}


@pytest.mark.parametrize(
    ("argv", "own", "target"),
    [
        (["-n", "2", "s.py", "--foo"], ["-n", "2"], ["s.py", "--foo"]),
        (["-n2", "--timeout=3", "s.py", "-n", "1"], ["-n2", "--timeout=3"], ["s.py", "-n", "1"]),
        (
            ["--no-prefix", "-n", "2", "-m", "pkg.mod", "-h"],
            ["--no-prefix", "-n", "2"],
            ["-m", "pkg.mod", "-h"],
        ),
        (["-n", "2", "-mpkg", "a"], ["-n", "2"], ["-m", "pkg", "a"]),
        (["-n", "2", "--", "-weird.py", "a"], ["-n", "2"], ["-weird.py", "a"]),
        (["-n", "2", "--bogus", "s.py"], ["-n", "2", "--bogus"], []),
    ],
)
def test_run_splits_its_own_options_from_the_targets(
    argv: list[str], own: list[str], target: list[str]
) -> None:
    assert _split_run_argv(argv) == (own, target)


def test_run_usage_errors_return_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = write_script(tmp_path, "pass")
    assert main(["run", "-n", "2"]) == 2
    assert main(["run", script]) == 2  # -n is required
    assert main(["run", "-n", "0", script]) == 2
    assert main(["run", "-n", "2", "--bogus", script]) == 2
    assert main(["run", "-n", "2", str(tmp_path / "missing.py")]) == 2
    assert "can't open file" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import aiocoll

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"aiocoll {aiocoll.__version__}"


def test_unknown_command_is_a_usage_error() -> None:
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_transports_lists_the_builtin_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["transports"]) == 0
    assert "inproc" in capsys.readouterr().out


def test_bench_says_so_when_the_build_lacks_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli, "_BENCH_MODULE", "aiocoll._no_such_bench")
    assert main(["bench", "-n", "2"]) == 2
    assert "aiocoll bench: not available in this build" in capsys.readouterr().err


def test_bench_gets_the_remaining_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_script(
        tmp_path,
        "seen = []\ndef main(args):\n    seen.append(args)\n    return 7\n",
        name="launcher_probe_bench.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_cli, "_BENCH_MODULE", "launcher_probe_bench")
    monkeypatch.delitem(sys.modules, "launcher_probe_bench", raising=False)
    assert main(["bench", "--op", "all_reduce", "-n", "2"]) == 7
    assert sys.modules["launcher_probe_bench"].seen == [["--op", "all_reduce", "-n", "2"]]


# -- cleanup --------------------------------------------------------------------------------


def test_cleanup_hook_runs_with_the_job_id_and_pids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hook_calls: list[LaunchInfo]
) -> None:
    script = write_script(
        tmp_path, 'import os; print(f"pid={os.getpid()} job={os.environ[\'AIOCOLL_JOB_ID\']}")'
    )
    assert main(["run", "-n", "2", script]) == 0
    out = capsys.readouterr().out
    (info,) = hook_calls
    assert set(re.findall(r"job=(\w+)", out)) == {info.job_id}
    assert list(info.pids) == printed_pids("\n".join(sorted(out.splitlines())))
    assert info.returncodes == (0, 0)


def test_failing_cleanup_hook_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, hook_calls: list[LaunchInfo]
) -> None:
    def broken(info: LaunchInfo) -> None:
        raise RuntimeError("hook exploded")

    script = write_script(tmp_path, "pass")
    register_cleanup(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="aiocoll.launch.launcher"):
            assert main(["run", "-n", "1", script]) == 0
    finally:
        unregister_cleanup(broken)
    assert len(hook_calls) == 1  # the hook registered before it still ran
    assert "hook exploded" in caplog.text


def grandchild_script(rank1_exit: int | None, sleep: float) -> str:
    """Each rank starts `sleep 60` in its process group and prints both pids."""
    return f"""
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "60"])
    print(f"pid={{os.getpid()}} pid={{child.pid}}", flush=True)
    if {rank1_exit is not None} and os.environ["RANK"] == "1":
        time.sleep(0.3)
        sys.exit({rank1_exit})
    time.sleep({sleep})
    """


def test_no_process_survives_a_failed_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(tmp_path, grandchild_script(2, 60))
    assert main(["run", "-n", "2", script]) == 2
    pids = printed_pids(capsys.readouterr().out)
    assert len(pids) == 4
    assert_all_dead(pids)


def test_no_process_survives_a_successful_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each rank exits 0 leaving `sleep` behind, holding the output pipes open.
    script = write_script(tmp_path, grandchild_script(0, 0))
    start = time.monotonic()
    assert main(["run", "-n", "2", script]) == 0
    assert time.monotonic() - start < 15
    pids = printed_pids(capsys.readouterr().out)
    assert len(pids) == 4
    assert_all_dead(pids)


async def test_cancelling_launch_kills_the_ranks_and_still_runs_cleanup(
    tmp_path: Path, hook_calls: list[LaunchInfo]
) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = write_script(
        tmp_path,
        f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL will do
        open(os.path.join({str(pid_dir)!r}, str(os.getpid())), "w").close()
        time.sleep(60)
        """,
    )
    out = io.BytesIO()
    task = asyncio.ensure_future(
        launch([script], 2, transport=None, timeout=None, stdout=out, stderr=out)
    )
    deadline = time.monotonic() + 20
    while len(list(pid_dir.iterdir())) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pids = [int(p.name) for p in pid_dir.iterdir()]
    assert len(pids) == 2
    assert_all_dead(pids)
    (info,) = hook_calls
    assert sorted(info.pids) == sorted(pids)


async def test_rank_that_cannot_start_raises_oserror(tmp_path: Path) -> None:
    script = write_script(tmp_path, "pass")
    with pytest.raises(OSError):
        await launch(
            [script], 2, transport=None, timeout=None, python=str(tmp_path / "no-python")
        )


# -- as a real process ----------------------------------------------------------------------


def test_python_m_aiocoll_run_as_a_subprocess(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        """
        import os, sys, time
        print("args", sys.argv[1:], flush=True)
        marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank0-printed")
        if os.environ["RANK"] == "0":
            open(marker, "w").close()
            sys.exit(0)
        deadline = time.monotonic() + 30
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.01)  # fail only once rank 0 has spoken, so its line is there to check
        sys.exit(int(os.environ["RANK"]) + 4)
        """,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "aiocoll", "run", "-n", "2", script, "--foo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 5, proc.stderr
    assert by_rank(proc.stdout) == {0: ["args ['--foo']"], 1: ["args ['--foo']"]}
    assert "aiocoll run: rank 1 failed with exit code 5" in proc.stderr


@pytest.mark.timeout(60)
def test_sigint_to_the_launcher_stops_every_rank(tmp_path: Path) -> None:
    script = write_script(tmp_path, grandchild_script(None, 60))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "aiocoll", "run", "-n", "2", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        pids = printed_pids(launcher.stdout.readline() + launcher.stdout.readline())
        assert len(pids) == 4
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGINT
    assert "aiocoll run: interrupted by SIGINT; stopped ranks 0, 1" in err
    assert_all_dead(pids)
