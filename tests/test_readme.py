"""The README is what a new user runs first: its commands are CI's, its tour runs cleanly."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def _first_bash_block(path: Path) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL)
    assert block, f"{path.name} has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_tour_runs_without_warnings():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python block"
    for block in blocks:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
        assert [str(w.message) for w in caught] == []


def test_readme_first_screen_has_two_one_line_commands():
    commands = _first_bash_block(README)
    assert len(commands) == 2, commands
    install_run, install_test = commands
    assert install_run.startswith("pip install -e . && mrissl collapse-check")
    assert install_test.startswith('pip install -e ".[test]" && ')
    assert "python -m pytest" in install_test
    # the first screen: the commands come before the first section heading
    text = README.read_text()
    assert text.index(install_run) < text.index("\n## ")


def test_ci_runs_the_readme_lines_verbatim_before_the_dev_extra():
    ci_lines = CI.read_text().splitlines()
    positions = []
    for command in _first_bash_block(README):
        assert command in ci_lines, f".ci/run does not run the README line {command!r}"
        positions.append(ci_lines.index(command))
    venv = next(i for i, line in enumerate(ci_lines) if " -m venv " in line)
    dev = next(i for i, line in enumerate(ci_lines) if '.[dev]"' in line)
    # a fresh environment, then the README lines, and only then the dev extra (so the tests
    # run with what [test] installs and nothing more)
    assert venv < positions[0] < positions[1] < dev


def test_quickstart_commands_are_the_readme_commands():
    assert _first_bash_block(ROOT / "docs" / "quickstart.md") == _first_bash_block(README)
