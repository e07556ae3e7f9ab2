"""With only the ``test`` extra installed, what needs another extra is skipped, not failed.

CI proves it on a real ``pip install -e ".[test]"`` (``.ci/run``); this test proves the
mechanism in any environment by hiding matplotlib from a child pytest run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mrissl

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(mrissl.__file__).resolve().parents[1])

_HIDE_AND_RUN = """
import sys
from importlib.abc import MetaPathFinder

class Hide(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_plot_examples_skip_without_matplotlib():
    pytest.importorskip("matplotlib")  # the skip below must come from hiding it, so have it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    targets = [
        "src/mrissl/diagnostics/plot.py",
        "src/mrissl/masking/plot.py",
        "tests/diagnostics/test_diag_plot.py",
    ]
    out = subprocess.run(
        [sys.executable, "-c", _HIDE_AND_RUN, "-q", "-rs", "-p", "no:cacheprovider", *targets],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "failed" not in report
    assert "passed" not in report  # everything there needs matplotlib: all skipped
    assert "needs matplotlib" in report  # the doctests, skipped by the root conftest
    assert "could not import 'matplotlib'" in report  # the test module's importorskip
