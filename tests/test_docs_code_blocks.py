"""Every code block of the documentation runs.

* ``pycon`` blocks (``>>>``) are doctests, collected by ``--doctest-glob=*.md``.
* ``python`` blocks of ``docs/*.md`` are executed here, each in a fresh namespace and a
  temporary working directory (the README's blocks are run by ``tests/test_readme.py``). A
  block that is deliberately not runnable, such as an excerpt of the implementation shown for
  reading, is preceded by ``<!-- not run: REASON -->``; keep those rare. A block that only
  includes part of an example (``--8<-- "examples/x.py:section"``) is checked to point at an
  existing section; the example itself runs in the ``examples`` session of the noxfile.
* ``bash`` blocks: every ``mrissl ...`` command is parsed by the command's own argument parser
  (so a renamed option fails here), and every extra named in a ``pip install`` line exists in
  ``pyproject.toml``. The README's two command lines are run verbatim by ``.ci/run``.

A block that needs an optional extra that is not installed (matplotlib for the plots) is skipped.
"""

from __future__ import annotations

import builtins
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [*DOCS, ROOT / "README.md"]
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>\S.*?) -->\s*$")
OPTIONAL = ("matplotlib", "lightning", "pytorch_lightning", "ignite", "torchmetrics")


def _blocks(path: Path, lang: str) -> list[tuple[int, str, str | None]]:
    """(line number, body, not-run reason) of each ``lang`` block of ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for match in re.finditer(r"```([a-z]*)\n(.*?)```", text, re.S):
        if match.group(1) != lang:
            continue
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.match(previous)
        out.append((line, match.group(2), reason.group("reason") if reason else None))
    return out


def _cases(pages: list[Path], lang: str) -> list[object]:
    return [
        pytest.param(page, line, body, reason, id=f"{page.name}:{line}")
        for page in pages
        for line, body, reason in _blocks(page, lang)
    ]


def _missing_optional(err: ImportError) -> str | None:
    for name in OPTIONAL:
        if name in str(err) and importlib.util.find_spec(name) is None:
            return name
    return None


@pytest.mark.parametrize(("page", "line", "body", "reason"), _cases(DOCS, "python"))
def test_python_block_runs(page, line, body, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"marked not run: {reason}")
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if lines and all(line.startswith("--8<--") for line in lines):
        for line in lines:
            target = line.split('"')[1]
            file, _, section = target.partition(":")
            text = (ROOT / file).read_text(encoding="utf-8")
            assert not section or f"--8<-- [start:{section}]" in text, f"{target} not found"
        pytest.skip("an excerpt of an example, which the examples session runs")
    monkeypatch.chdir(tmp_path)
    code = compile(body, f"{page}:{line}", "exec")
    try:
        exec(code, {"__name__": "__docs__"})
    except ImportError as err:
        missing = _missing_optional(err)
        if missing is None:
            raise
        pytest.skip(f"needs {missing}, which is not installed")


def test_not_run_markers_are_rare_and_give_a_reason():
    marked = [(page.name, line) for page in PAGES for line, _, r in _blocks(page, "python") if r]
    total = sum(len(_blocks(page, "python")) for page in PAGES)
    assert len(marked) <= max(4, total // 2), f"too many blocks marked not run: {marked}"


def _extras() -> set[str]:
    """The extras of ``pyproject.toml`` (read without tomllib, which Python 3.10 lacks)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z][a-z0-9_-]*) = ", section, flags=re.M))


def _commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    lines = (line.split(" #")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(("page", "line", "body", "reason"), _cases(PAGES, "bash"))
def test_bash_block_commands_exist(page, line, body, reason, tmp_path, monkeypatch):
    from mrissl.cli import _parser

    # the parser checks that input files exist: the documented inputs exist here, empty
    monkeypatch.chdir(tmp_path)
    extras = _extras()
    for command in _commands(body):
        for part in command.split("&&"):
            argv = shlex.split(part)
            if argv and argv[0] == "mrissl":
                for arg in argv[1:]:
                    if arg.endswith((".pt", ".pth", ".nii", ".nii.gz")):
                        (tmp_path / arg).parent.mkdir(parents=True, exist_ok=True)
                        (tmp_path / arg).touch()
                code: object = 0
                try:
                    _parser().parse_args(argv[1:])
                except SystemExit as exit_:  # argparse exits 2 on an unknown option
                    code = exit_.code
                assert code == 0, f"{page.name}:{line}: `{part.strip()}` does not parse"
            if argv[:2] == ["pip", "install"]:
                for spec in argv[2:]:
                    named = re.search(r"\[([a-z,]+)\]", spec)
                    if named and spec.split("[")[0] in (".", "mrissl"):
                        unknown = set(named.group(1).split(",")) - extras
                        assert not unknown, f"{page.name}:{line}: no extra {unknown} in pyproject"


def _defined_in_src() -> set[str]:
    """Every name that ``src/mrissl`` defines or assigns (functions, classes, variables)."""
    names: set[str] = set()
    pattern = re.compile(r"^\s*(?:def|class)\s+(\w+)|^\s*(\w+)\s*(?::[^=]*)?=[^=]", re.M)
    for path in (ROOT / "src" / "mrissl").rglob("*.py"):
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            names.add(match.group(1) or match.group(2))
    return names


@pytest.mark.parametrize(
    ("page", "line", "body", "reason"),
    [case for case in _cases(PAGES, "python") if "implementation" in str(case.values[3])],
)
def test_implementation_excerpts_call_what_the_code_defines(page, line, body, reason):
    # an excerpt is not run, so a renamed helper would go unnoticed: every bare name it calls
    # must still exist in the library (or be a builtin)
    called = set(re.findall(r"(?<![\w.])([A-Za-z_]\w*)\(", body))
    missing = sorted(called - _defined_in_src() - set(dir(builtins)))
    assert not missing, f"{page.name}:{line}: the excerpt calls {missing}, defined nowhere in src"
