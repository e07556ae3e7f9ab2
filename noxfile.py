"""Development tasks: ``nox -s tests lint typecheck docs examples benchmarks``.

Every session runs in one shared virtual environment (``.nox/shared``, or the one named by
``MRISSL_NOX_ENV``) holding ``mrissl[dev]``: PyTorch is several gigabytes, so it is installed
once, not once per session. The environment is refreshed when ``pyproject.toml`` changes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
ENV = Path(os.environ.get("MRISSL_NOX_ENV", ROOT / ".nox" / "shared")).resolve()
nox.options.sessions = ["tests", "lint", "typecheck", "docs", "examples"]


def _python(session: nox.Session) -> str:
    """Create or refresh the shared environment and return its interpreter."""
    python = ENV / "bin" / "python"
    stamp = ENV / ".mrissl-pyproject-sha256"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not python.exists():
        session.run(sys.executable, "-m", "venv", str(ENV), external=True)
    if not stamp.exists() or stamp.read_text() != digest:
        session.run(str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]", external=True)
        stamp.write_text(digest)
    return str(python)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite and the doctests (pass extra pytest arguments after ``--``)."""
    session.run(_python(session), "-m", "pytest", *session.posargs, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    python = _python(session)
    session.run(python, "-m", "ruff", "check", ".", external=True)
    session.run(python, "-m", "ruff", "format", "--check", ".", external=True)


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """Mypy in strict mode on the library."""
    session.run(_python(session), "-m", "mypy", "src/mrissl", external=True)


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # the Material theme's notice about its successor
    session.run(
        _python(session),
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(ROOT / "site"),
        external=True,
    )


@nox.session(venv_backend="none")
def examples(session: nox.Session) -> None:
    """Run every script in examples/ in its quick mode."""
    python = _python(session)
    for script in sorted((ROOT / "examples").glob("*.py")):
        session.run(python, str(script), "--quick", external=True)


@nox.session(venv_backend="none")
def benchmarks(session: nox.Session) -> None:
    """Run every benchmark (``nox -s benchmarks -- --quick`` for a smoke run)."""
    python = _python(session)
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run(python, str(script), *session.posargs, external=True)
