"""One progress bar on stderr, shared by the floor estimator and the command.

tqdm when it is installed (it is not a dependency of mrissl), else one line on stderr that
rewrites itself with the count and the time per item.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """Counts ``unit``s done out of ``total``; does nothing when not ``enabled``.

    Args:
        total: the number of units, or ``None`` when unknown.
        desc: the label in front of the bar.
        unit: what is counted (``"case"``, ``"batch"``).
        enabled: show the bar; off, ``update`` and ``close`` do nothing.

    Examples:
        >>> bar = ProgressBar(3, "demo", "case", enabled=False)
        >>> for _ in range(3):
        ...     bar.update()
        >>> bar.done
        3
        >>> bar.close()
    """

    def __init__(self, total: int | None, desc: str, unit: str, *, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = 0
        self.start = time.perf_counter()
        self._tqdm: Any = None
        if enabled:
            try:
                tqdm_auto = importlib.import_module("tqdm.auto")
            except ImportError:
                return
            self._tqdm = tqdm_auto.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.enabled:
            of = "" if self.total is None else f"/{self.total}"
            rate = (time.perf_counter() - self.start) / self.done
            sys.stderr.write(
                f"\r{self.desc}: {self.done}{of} {self.unit}s, {rate:.2f} s/{self.unit}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        """End the bar (a newline after the stderr line)."""
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()
