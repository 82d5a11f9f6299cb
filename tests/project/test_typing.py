"""mypy --strict on user code: a numpy array in gives the same numpy type out, a tensor gives a
tensor, and a misspelt op name is an error (issue 13 item 4)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the snippet uses torch tensors; the [test] set-up (.ci/run) installs torch")

REPO = Path(__file__).resolve().parents[2]
MYPY = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")

USER = textwrap.dedent(
    """
    import numpy as np
    import numpy.typing as npt
    import torch
    import aiocoll


    async def main(x: npt.NDArray[np.float32], t: torch.Tensor) -> None:
        reveal_type(await aiocoll.all_reduce(x, "avg"))                   # line 9
        reveal_type(await aiocoll.all_gather(t, dim=1))                   # line 10
        reveal_type(await aiocoll.gather(x, 0))                           # line 11
        reveal_type(await aiocoll.reduce_scatter_coalesced([t], aiocoll.ReduceOp.MAX))  # line 12
        reveal_type(await aiocoll.broadcast(b"bytes", 0))                 # line 13
        await aiocoll.all_reduce(x, op="summ")                            # line 14
        await aiocoll.reduce(t, 0, "MAX")                                 # line 15
    """
)


@pytest.mark.skipif(not Path(MYPY).exists(), reason="mypy not installed (it is in the [test] extra, so CI runs this)")
def test_mypy_strict_on_user_code(tmp_path: Path) -> None:
    # The installed layout (aiocoll.transports inside aiocoll), as a user's checker sees it.
    shutil.copytree(REPO / "aiocoll", tmp_path / "aiocoll", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "transports", tmp_path / "aiocoll" / "transports", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "user.py").write_text(USER)
    # silent: report only the user's file, as for a package installed in site-packages
    proc = subprocess.run([MYPY, "--strict", "--follow-imports=silent", "--no-incremental", "user.py"],
                          cwd=tmp_path, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    revealed = dict(re.findall(r"user\.py:(\d+): note: Revealed type is \"(.*)\"", out))
    assert revealed["9"].startswith("numpy.ndarray[") and "_32Bit" in revealed["9"], out
    assert revealed["10"] == "torch._tensor.Tensor", out
    assert revealed["11"].startswith("numpy.ndarray[") and revealed["11"].endswith("| None"), out
    assert revealed["12"] == "list[torch._tensor.Tensor]", out
    assert revealed["13"] == "Any", out  # other inputs (buffer protocol, DLPack) stay open
    errors = re.findall(r"user\.py:(\d+): error: (.*)", out)
    assert [line for line, _ in errors] == ["14"], out
    assert "No overload variant of \"all_reduce\"" in errors[0][1], out
