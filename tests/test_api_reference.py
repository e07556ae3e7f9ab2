"""Every public name of the packages has an entry in the API reference (docs/api)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["data", "diagnostics", "losses", "masking", "nn", "templates"]


def _documented() -> set[str]:
    """Names with a ``::: mrissl....name`` entry, or in a ``members: [...]`` list, of docs/api."""
    names: set[str] = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        names.update(re.findall(r"^::: mrissl[\w.]*\.(\w+)\s*$", text, flags=re.M))
        for members in re.findall(r"members: \[([^\]]*)\]", text):
            names.update(m.strip() for m in members.split(","))
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_in_the_api_reference(package):
    # a name missing there breaks every link to it ("could not find cross-reference target")
    module = importlib.import_module(f"mrissl.{package}")
    documented = _documented()
    missing = [name for name in module.__all__ if name not in documented]
    assert not missing, f"docs/api has no entry for {missing} of mrissl.{package}"
