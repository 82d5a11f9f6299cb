"""Every code block of README.md runs as written.

Each block is preceded by a marker saying how it is run; a block without one fails
``test_every_block_says_how_it_is_run``:

- ``<!-- readme-test: aiocoll run -n N[; python][; needs torch] -->``: the block is saved as a
  script and run with ``aiocoll run -n N`` (and with plain ``python``, a world of 1, when
  ``python`` is listed); it must exit 0 and print, and what it prints is checked below where the
  block's output is known in advance.
- ``<!-- readme-test: pytest -->``: the block is saved as a test file and run by pytest in a
  folder of its own, with ``asyncio_mode=strict`` (what a user's project without our pytest
  configuration has): its tests must pass.
- ``<!-- readme-test: recipe -->``: a recipe for a cluster (several nodes, Slurm, Ray, Kubernetes)
  that cannot run here: shell is checked by ``bash -n``, Python by compiling it.
- ``<!-- readme-test: shell -->``: each line is a chain of commands joined by ``&&``. Installing
  (``python3 -m venv``, ``pip install``) is not repeated: the suite runs in an environment made
  by those very commands, and the test checks that the extras named exist in pyproject.toml.
  ``.venv/bin/aiocoll ...`` runs with this interpreter's aiocoll; ``.venv/bin/pytest`` is this
  suite, which is running (not started again).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MARKED = re.compile(r"<!-- readme-test: (.*?) -->\n```(\w*)\n(.*?)^```", re.M | re.S)
BLOCKS = [(m[1], m[3]) for m in MARKED.finditer(README)]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_every_block_says_how_it_is_run():
    assert len(BLOCKS) == len(BLOCK.findall(README)) >= 8


def _aiocoll(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiocoll", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _check_output(code: str, how: str, out: str) -> None:
    """What the blocks whose output is known in advance must print."""
    lines = out.splitlines()
    if "max over" in code:  # the API in one screen
        if how == "python":
            assert lines == ["rank 0 of 1: sum 0, gathered 1000, broadcast 0, max over [0]: 0"], out
        else:
            want = {f"[{r}] rank {r} of 4: sum 6, gathered 4000, broadcast 0, max over [0, 1]: "
                    f"{1 if r < 2 else '-'}" for r in range(4)}
            assert set(lines) == want, out
    elif "DeviceMesh" in code:
        assert "[0] 0 [2, 2] [0, 1] ('', [0, 1, 2, 3], 2)" in lines, out
        assert "[3] 3 [4, 4] [2, 3] ('', [0, 1, 2, 3], 2)" in lines, out
    elif "renew_group" in code:  # rounds 0, 1, 3 total (0+k)+(1+k); round 2 is skipped
        for r in (0, 1):
            got = [line for line in lines if line.startswith(f"[{r}] rank {r}: round")]
            assert [g.split(": ", 1)[1].split(":")[0] for g in got] == [
                "round 0 total 1", "round 1 total 3", "round 2 skipped", "round 3 total 7"], out
    elif "metrics.snapshot" in code:
        for r in (0, 1):
            assert any(re.fullmatch(rf"\[{r}\] rank {r}: 3 all_reduce, 12000 B, the hook saw 3, the slowest "
                                    r"took [\d.]+ ms", line) for line in lines), out


@pytest.mark.parametrize("how, code", [b for b in BLOCKS if b[0].startswith("aiocoll run")],
                         ids=lambda v: v.split("\n")[0][:40] if "\n" in v else v)
def test_a_python_block_runs_and_prints(how, code, tmp_path):
    if "needs torch" in how and not HAS_TORCH:
        pytest.skip("needs torch (installed with the [torch] extra; the README's suite install has it)")
    script = tmp_path / "block.py"
    script.write_text(code)
    n = re.match(r"aiocoll run -n (\d+)", how)[1]
    proc = _aiocoll(["run", "-n", n, str(script)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip(), "the block prints nothing"
    _check_output(code, "run", proc.stdout)
    if "python" in how.split("; "):
        plain = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, env={k: v for k, v in os.environ.items()
                                                 if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
        assert plain.returncode == 0, plain.stderr
        _check_output(code, "python", plain.stdout)


@pytest.mark.parametrize("code", [c for how, c in BLOCKS if how == "pytest"])
def test_the_testing_block_passes_under_pytest(code, tmp_path):
    (tmp_path / "test_sum.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=strict", "test_sum.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and re.search(r"^3 passed", proc.stdout, re.M), proc.stdout + proc.stderr


def _extras() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@pytest.mark.parametrize("line", [line for how, c in BLOCKS if how == "shell" for line in c.splitlines() if line])
def test_a_shell_line_runs(line, tmp_path):
    for command in line.split(" && "):
        words = shlex.split(command)
        if words[:3] == ["python3", "-m", "venv"]:
            assert importlib.util.find_spec("venv") is not None
        elif words[0] == ".venv/bin/pip" and words[1] == "install":
            for spec in words[2:]:
                extras = re.fullmatch(r"\.(?:\[(.*)\])?", spec)
                if extras and extras[1]:
                    assert set(extras[1].split(",")) <= _extras(), spec
        elif words[0] == ".venv/bin/pytest":
            assert (REPO / "tests").is_dir()  # this suite, running now
        elif words[0] == ".venv/bin/aiocoll":
            if "train_sync.py" in command and not HAS_TORCH:
                pytest.skip("examples/train_sync.py needs torch")
            proc = _aiocoll(words[1:], REPO)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            if "demo.py" in command:
                assert re.search(r"longest gap [\d.]+ ms against a threshold of 50 ms: ", proc.stdout), proc.stdout
            if "--check" in command:
                assert "data-parallel loss matches the single-process run" in proc.stdout, proc.stdout
        else:
            raise AssertionError(f"README shell command the test does not know how to check: {command!r}")


@pytest.mark.parametrize("code", [c for how, c in BLOCKS if how == "recipe"])
def test_a_recipe_is_at_least_well_formed(code: str, tmp_path: Path) -> None:
    if code.lstrip().startswith(("#!/bin/bash", "torchrun", "RANK=", "srun", "mpirun")) or "\\\n" in code:
        script = tmp_path / "recipe.sh"
        script.write_text(code)
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    else:
        compile(code, "README recipe", "exec")
