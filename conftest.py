"""Root fixtures and hooks for tests, docstring examples (src) and the documentation (docs).

* The value checks are on for every test and doctest. The library's default is ``"none"`` (no
  host synchronisation on the training-step path); our own tests run with ``"values"`` so that
  a NaN never passes silently. A test of the default behaviour switches back with
  ``mrissl.checks("none")``.
* Optional extras: ``pip install -e ".[test]"`` installs what the tests need, not matplotlib
  (``plot``) or the training-framework integrations. A library module that imports one of them
  at its top is not collected for doctests where it is missing, and a doctest (in a docstring
  or a Markdown page) that fails only because one is missing is reported as skipped. Test
  modules use ``pytest.importorskip``.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem, MultipleDoctestFailures

import mrissl

#: import names of the optional packages, with the extra that installs each
OPTIONAL = {
    "matplotlib": "plot",
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "ignite": "ignite",
    "torchmetrics": "torchmetrics",
}

# The docstrings of mrissl.integrations need their frameworks (optional extras); their tests
# skip themselves with pytest.importorskip.
collect_ignore = [
    f"src/mrissl/integrations/{module}.py"
    for module, package in (
        ("lightning", "lightning"),
        ("ignite", "ignite"),
        ("torchmetrics", "torchmetrics"),
    )
    if importlib.util.find_spec(package) is None
]


@pytest.fixture(autouse=True)
def _value_checks_on() -> Iterator[None]:
    with mrissl.checks("values"):
        yield


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _missing_at_top(path: Path) -> str | None:
    """An optional package that ``path`` imports at module level and that is not installed."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:  # top level only: imports inside functions are lazy
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            root = name.split(".")[0]
            if root in OPTIONAL and not _installed(root):
                return root
    return None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip collecting library modules whose optional dependency is missing."""
    path = Path(collection_path)
    if path.suffix != ".py" or path.name.startswith("test_") or path.name == "conftest.py":
        return None
    return True if _missing_at_top(path) else None


def _missing_optional(err: BaseException | None) -> str | None:
    """The optional package whose absence caused ``err`` (through its causes), if any."""
    while err is not None:
        if isinstance(err, ImportError):
            names = [err.name or ""] + [w.strip("'\".:,") for w in str(err).split()]
            for name in names:
                root = name.split(".")[0]
                if root in OPTIONAL and not _installed(root):
                    return root
        err = err.__cause__ or err.__context__
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Report a doctest that needs a missing optional package as skipped, not failed."""
    try:
        return (yield)
    except (doctest.UnexpectedException, MultipleDoctestFailures) as failure:
        if not isinstance(item, DoctestItem):
            raise
        failures = getattr(failure, "failures", [failure])
        for one in failures:
            if isinstance(one, doctest.UnexpectedException):
                missing = _missing_optional(one.exc_info[1])
                if missing:
                    pytest.skip(
                        f"needs {missing}, which is not installed "
                        f'(pip install -e ".[{OPTIONAL[missing]}]")'
                    )
        raise
