"""The host-synchronisation guard of the step-path tests (imported by their modules).

``forbid_host_sync()`` makes every way a Python program reads a tensor's value on the host
raise ``HostSyncError`` while it is active: ``bool(t)``, ``t.item()``, ``t.tolist()``,
``int(t)``, ``float(t)``, ``t.__index__()`` and the data-dependent-shape ``nonzero`` (method
and function). On a GPU each of these waits for the device to finish its queue; on the CPU they
are free, which is why a test of the CPU build needs this guard to see them at all. The guard
is restored on exit, also after an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class HostSyncError(RuntimeError):
    """A tensor value was read on the host while the guard was active."""


_TENSOR_METHODS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero")


def _raiser(name: str) -> Callable[..., Any]:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(f"host synchronisation on the step path: {name}")

    return forbidden


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Raise ``HostSyncError`` on any host read of a tensor value inside the block."""
    saved_methods = {name: torch.Tensor.__dict__.get(name) for name in _TENSOR_METHODS}
    saved_nonzero = torch.nonzero
    try:
        for name in _TENSOR_METHODS:
            setattr(torch.Tensor, name, _raiser(f"Tensor.{name}"))
        torch.nonzero = _raiser("torch.nonzero")
        yield
    finally:
        for name, method in saved_methods.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
        torch.nonzero = saved_nonzero
