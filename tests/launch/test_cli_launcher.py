"""`aiocoll run` as a newcomer meets it: a bad --transport, the report of a failed job, progress bars."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from aiocoll.launch.cli import main
from aiocoll.launch.launcher import _LineRelay, _Sink, launch


def write_script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "rank.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


@pytest.mark.parametrize("transport, why", [("foo", "unknown transport 'foo'"), ("inproc", "one process per rank")])
def test_a_transport_no_rank_can_use_is_refused_before_any_rank_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], transport: str, why: str
) -> None:
    started = tmp_path / "started"
    script = write_script(tmp_path, f"open({str(started)!r}, 'a').write('x')\n")
    assert main(["run", "-n", "2", "--transport", transport, script]) == 2
    err = capsys.readouterr().err
    assert why in err and err.startswith("aiocoll run: --transport")
    assert not started.exists()


def test_the_report_names_the_failure_that_caused_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rank 1 fails first, with the error a peer's failure gives (as a survivor does when the
    # culprit left); rank 0, the culprit, raises its own error just after. The report must name
    # rank 0 and its error, and rank 0 must not be stopped before it can say it.
    flag = tmp_path / "rank1-failed"
    script = write_script(
        tmp_path,
        f"""
        import os, time
        from aiocoll import PeerFailureError
        if os.environ["RANK"] == "1":
            open({str(flag)!r}, "w").close()
            raise PeerFailureError("rank 0 was lost", ranks=[0])
        while not os.path.exists({str(flag)!r}):
            time.sleep(0.01)
        time.sleep(0.2)
        raise ValueError("the real cause")
        """,
    )
    assert main(["run", "-n", "2", script]) == 1
    err = capsys.readouterr().err
    report = err.strip().splitlines()[-1]
    assert report.startswith("aiocoll run: rank 0 failed with exit code 1: ValueError: the real cause"), err
    assert "rank 1 failed just before it, a consequence" in report, err
    assert "[0] ValueError: the real cause" in err


def test_a_rank_killed_by_a_signal_is_blamed_even_after_a_consequence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = tmp_path / "rank1-failed"
    script = write_script(
        tmp_path,
        f"""
        import os, signal, time
        from aiocoll import PeerFailureError
        if os.environ["RANK"] == "1":
            open({str(flag)!r}, "w").close()
            raise PeerFailureError("rank 0 was lost", ranks=[0])
        while not os.path.exists({str(flag)!r}):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert main(["run", "-n", "2", script]) == 128 + 9
    report = capsys.readouterr().err.strip().splitlines()[-1]
    assert report.startswith("aiocoll run: rank 0 failed with signal 9 (SIGKILL)"), report


def relay(chunks: list[bytes]) -> bytes:
    out = io.BytesIO()
    r = _LineRelay(b"[3] ", _Sink(out))
    for c in chunks:
        r.feed(c)
    r.flush()
    return out.getvalue()


@pytest.mark.parametrize(
    "chunks, want",
    [
        ([b"10%\r20%", b"\r30%\rdone\n"], b"[3] 10%\r[3] 20%\r[3] 30%\r[3] done\n"),
        ([b"a\r", b"\nb\n"], b"[3] a\r\n[3] b\n"),  # CRLF split across reads: one ending
        ([b"a\r\r\nb"], b"[3] a\r[3] \r\n[3] b\n"),
        ([b"bar 99%\r"], b"[3] bar 99%\n"),  # the last redraw stays, on its own line
        ([b"x\n", b"", b"y"], b"[3] x\n[3] y\n"),
    ],
)
def test_carriage_returns_end_a_piece_that_keeps_its_prefix(chunks: list[bytes], want: bytes) -> None:
    assert relay(chunks) == want


async def test_a_progress_bar_in_a_rank_shows_as_it_runs(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        """
        import sys, time
        for i in range(3):
            sys.stdout.write(f"\\rstep {i}")
            sys.stdout.flush()
            time.sleep(0.05)
        print()
        """,
    )
    out, err = io.BytesIO(), io.BytesIO()
    result = await launch([script], 1, transport=None, timeout=None, stdout=out, stderr=err, handle_signals=False)
    assert result.exit_code == 0, err.getvalue()
    assert out.getvalue() == b"[0] \r[0] step 0\r[0] step 1\r[0] step 2\n"


def test_ranks_import_the_real_torch_not_a_subpackage_of_aiocoll(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The launcher puts its own checkout on the ranks' path; putting the package folder there
    # instead made aiocoll/torch (and every other sub-package) a top-level name in the ranks.
    import aiocoll

    package = str(Path(aiocoll.__file__).resolve().parent)
    script = write_script(
        tmp_path,
        f"""
        import json, os, sys
        print(json.dumps([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) + sys.path
                          if p and os.path.realpath(p) == {package!r}]))
        """,
    )
    assert main(["run", "-n", "1", script]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "[0] []", out
