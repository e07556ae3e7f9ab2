"""The layering of docs/architecture.md, enforced from the import graph of src/mrissl.

Every import of a mrissl module counts, also one made inside a function (a lazy import is still
a dependency). A module's package is its first component below ``mrissl`` (``mrissl.losses.pyramid``
belongs to ``losses``); imports inside one package are free.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mrissl"

#: package -> the packages it may import (besides itself). The foundation modules (_version,
#: _settings, _checks, _io, _progress, modalities) import no other package but each other.
FOUNDATION = {"_version", "_settings", "_checks", "_io", "_progress", "modalities"}
ALLOWED: dict[str, set[str]] = {
    **{name: FOUNDATION for name in FOUNDATION},
    "__init__": FOUNDATION,
    "nn": FOUNDATION,
    "distributed": FOUNDATION,
    "masking": FOUNDATION | {"nn", "distributed"},
    "losses": FOUNDATION | {"nn", "distributed"},
    "diagnostics": FOUNDATION | {"nn", "distributed"},
    "templates": FOUNDATION | {"nn", "distributed", "masking"},
    "data": FOUNDATION | {"nn", "distributed", "masking", "losses", "diagnostics", "templates"},
    # the command: argument types, the parser, one module per subcommand (all but cli private)
    "_cli_args": FOUNDATION,
    "_cli_parser": FOUNDATION | {"_cli_args"},
    "_cli_rank": FOUNDATION | {"_cli_args", "diagnostics"},
    "_cli_templates": FOUNDATION | {"_cli_args", "templates"},
    "cli": FOUNDATION
    | {"nn", "distributed", "masking", "losses", "diagnostics", "templates", "data"}
    | {"_cli_args", "_cli_parser", "_cli_rank", "_cli_templates"},
    "__main__": {"cli"},
    "integrations": FOUNDATION
    | {"nn", "distributed", "masking", "losses", "diagnostics", "templates", "data"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_packages(path: Path) -> set[str]:
    """The mrissl packages that the module at ``path`` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mrissl":  # from mrissl import masking
                names = [f"mrissl.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mrissl" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(SRC.rglob("*.py"))


def test_every_package_has_a_layer():
    assert {_package(p) for p in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_the_layers_below_it(path):
    package = _package(path)
    imported = _imported_packages(path) - {package}
    forbidden = imported - ALLOWED[package]
    assert not forbidden, (
        f"{path.relative_to(SRC)} ({package}) imports {sorted(forbidden)}; "
        f"see docs/architecture.md for what {package} may import"
    )


def test_nothing_imports_cli_or_integrations():
    for path in MODULES:
        package = _package(path)
        imported = _imported_packages(path) - {package}
        if package != "__main__":
            assert "cli" not in imported, path
        assert "integrations" not in imported, path


def test_the_checker_sees_lazy_and_package_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from mrissl import masking\n    import mrissl.losses.pyramid\n"
        "from mrissl.nn import PatchEmbed3d\n"
    )
    assert _imported_packages(module) == {"masking", "losses", "nn"}


MAX_LINES = 600  # issue 14: a module that grows past this holds several concerns


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it by concern"
