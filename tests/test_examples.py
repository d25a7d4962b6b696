"""Every script in examples/ runs against a worker and checks its own answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.workers import ROOT, WorkerProcess

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_is_listed_in_its_readme() -> None:
    listed = (ROOT / "examples" / "README.md").read_text()
    assert EXAMPLES
    assert [path.name for path in EXAMPLES if f"`{path.name}`" not in listed] == []


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_the_example_runs(script: Path, worker: WorkerProcess, tmp_path: Path) -> None:
    target = (
        f"http://127.0.0.1:{worker.http_port}" if script.name == "v2_rest.py" else worker.target
    )
    done = subprocess.run(
        [sys.executable, str(script), target],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # as another team runs it: not from this repository's root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout
