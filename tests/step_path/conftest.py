"""Fixtures of the step-path tests."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from _sync_guard import forbid_host_sync


@pytest.fixture
def no_host_sync() -> Callable[[], AbstractContextManager[None]]:
    """The guard of ``_sync_guard`` as a fixture: ``with no_host_sync(): step()``."""
    return forbid_host_sync
