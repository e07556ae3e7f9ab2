"""Docstrings link the guides' headings as ``[text][anchor]``; every such anchor must exist.

mkdocs checks the links of the docstrings it renders, but not those of module docstrings that no
API page shows, and an anchor that is also a heading of an API page would silently point there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

toc = pytest.importorskip("markdown.extensions.toc")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mrissl"
# [text][anchor] where the anchor is a heading slug (no dots: not a Python object path)
LINK = re.compile(r"\]\[([a-z0-9][a-z0-9-]*)\]")


def _slugs(pages: list[Path]) -> list[str]:
    slugs = []
    for page in pages:
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                title = line.lstrip("#").strip().replace("`", "")
                slugs.append(toc.slugify(title, "-"))
    return slugs


GUIDES = _slugs(sorted((ROOT / "docs").glob("*.md")))
API = _slugs(sorted((ROOT / "docs" / "api").glob("*.md")))


def _links() -> list[tuple[str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node) or ""
                # prose only: doctest lines index tensors as x[0][i]
                doc = "\n".join(
                    line
                    for line in doc.splitlines()
                    if not line.lstrip().startswith((">>>", "..."))
                )
                found += [(str(path.relative_to(SRC)), a) for a in LINK.findall(doc)]
    return found


LINKS = _links()


def test_the_docstrings_link_some_guide_headings():
    assert len(LINKS) >= 5


@pytest.mark.parametrize(("module", "anchor"), LINKS, ids=[f"{m}:{a}" for m, a in LINKS])
def test_guide_link_names_one_guide_heading(module, anchor):
    assert GUIDES.count(anchor) == 1, f"{module}: no single guide heading with anchor {anchor!r}"
    assert anchor not in API, f"{module}: {anchor!r} is also a heading of an API page"
