"""The package as users get it: public surface, wheel contents, type checking."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import aiocoll

REPO = Path(__file__).resolve().parents[2]


def test_all_lists_exactly_the_public_names():
    public = {
        name
        for name, obj in vars(aiocoll).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType) and name != "annotations"
    }
    assert set(aiocoll.__all__) - {"__version__"} == public
    assert len(aiocoll.__all__) == len(set(aiocoll.__all__))


def test_group_lifetime_is_public_in_both_apis():
    import aiocoll.sync

    assert "destroy_group" in aiocoll.__all__ and "destroy_group" in aiocoll.sync.__all__
    assert "Raises:" in (aiocoll.destroy_group.__doc__ or "")


def test_every_public_name_is_documented():
    for name in aiocoll.__all__:
        obj = getattr(aiocoll, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"aiocoll.{name} has no docstring"


def test_transports_import_under_the_package():
    import aiocoll.transports.inproc as inproc

    assert inproc.__name__ == "aiocoll.transports.inproc"
    assert "transports" not in sys.modules  # never a bare top-level package


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")
    # build from a copy so no build/ or egg-info lands in the checkout
    for item in ("pyproject.toml", "README.md", "aiocoll", "transports"):
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / item, src / item)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
    )
    (whl,) = out.glob("aiocoll-*.whl")
    return whl


def test_wheel_has_aiocoll_as_its_only_top_level_name(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"aiocoll"}
    assert "aiocoll/transports/__init__.py" in names
    assert "aiocoll/transports/inproc.py" in names
    assert "aiocoll/transports/tcp.py" in names
    assert "aiocoll/py.typed" in names
    assert not any(n.startswith("aiocoll/tests") for n in names)


def test_wheel_declares_builtin_transports_as_entry_points(wheel: Path):
    zf = zipfile.ZipFile(wheel)
    (ep,) = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
    text = zf.read(ep).decode()
    assert "[aiocoll.transports]" in text
    assert "tcp = aiocoll.transports.tcp:TcpTransport" in text


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(),
                    reason="mypy not installed (it is in the [test] extra, so CI runs this)")
def test_mypy_strict_passes(tmp_path: Path):
    # mypy follows the installed layout: aiocoll/transports inside aiocoll/
    pkg = tmp_path / "aiocoll"
    shutil.copytree(REPO / "aiocoll", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "transports", pkg / "transports", ignore=shutil.ignore_patterns("__pycache__"))
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    proc = subprocess.run(
        [mypy, "--config-file", str(REPO / "pyproject.toml"), "--no-incremental", "-p", "aiocoll"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
