"""The API reference (issue 13 item 9): scripts/build_api_reference.sh generates it from the
docstrings with pdoc; every public name gets its entry, with its docstring."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pdoc", reason="pdoc is in the [test] extra (.ci/run installs it)")

import aiocoll  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_api_reference_builds_with_every_public_name(tmp_path: Path) -> None:
    out = tmp_path / "api"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "build_api_reference.sh"), str(out)],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "aiocoll.html", "aiocoll/sync.html", "aiocoll/torch.html", "aiocoll/testing.html"):
        assert (out / page).is_file(), page
    top = (out / "aiocoll.html").read_text()
    anchors = set(re.findall(r'id="([A-Za-z_][\w.]*)"', top))
    missing = [n for n in aiocoll.__all__ if n != "__version__" and n not in anchors]
    assert not missing, f"public names without an entry in the reference: {missing}"
    text = html.unescape(re.sub(r"<[^>]+>", "", top))
    assert text.count("Raises") >= 10  # docstrings are rendered, not just the names


def test_readme_links_the_reference() -> None:
    readme = (REPO / "README.md").read_text()
    assert "scripts/build_api_reference.sh" in readme
