"""The command line answers ``--help`` without importing torch, MONAI, timm or NumPy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mrissl

HEAVY = ("torch", "monai", "timm", "numpy", "nibabel", "einops")
SRC = str(Path(mrissl.__file__).resolve().parents[1])

_PROBE = """
import sys
{body}
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))
print(','.join(heavy))
"""


def _heavy_modules_after(body: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body, heavy=HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return [m for m in line.split(",") if m]


def test_import_cli_is_light():
    assert _heavy_modules_after("import mrissl.cli") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["collapse-check", "--help"],
        ["rank", "--help"],
        ["templates", "--help"],
        ["templates", "export", "--help"],
        ["--version"],
    ],
)
def test_help_imports_nothing_heavy(argv):
    body = (
        "import contextlib, io\n"
        "from mrissl.cli import main\n"
        "buf = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(buf):\n"
        f"        main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert buf.getvalue().strip(), 'no help printed'\n"
    )
    assert _heavy_modules_after(body) == []


def test_subcommand_does_import_torch(tmp_path):
    """The probe can see an import: running a subcommand does load torch."""
    (tmp_path / "empty.pt").write_bytes(b"")  # exists, so argparse lets the subcommand run
    body = (
        "from mrissl.cli import main\n"
        f"main(['templates', 'export', {str(tmp_path / 'empty.pt')!r}, {str(tmp_path)!r}])\n"
    )
    assert "torch" in _heavy_modules_after(body)
