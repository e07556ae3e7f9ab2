"""Shared timing and memory harness for the scripts in ``benchmarks/``.

Each script builds a list of :class:`Case` objects (our callable and a baseline's, doing the
same work on the same input) and hands them to :func:`compare`, which times both interleaved in
one process, prints a plain-text table and optionally writes JSON. Scripts are measurements,
not tests: they exit with status 0 even when a target is missed, and say which ones were.

How things are measured:

* Wall time: ``time.perf_counter`` around one call; on CUDA ``torch.cuda.synchronize()`` is
  called before starting and before stopping the clock. Warm-up calls are not timed.
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` before the
  call (bytes held by the caching allocator on top of that are not counted).
* Peak memory, CPU: ``tracemalloc`` does not see torch's allocations and
  ``ru_maxrss`` cannot be reset, so a background thread reads the resident set size from
  ``/proc/self/statm`` about every millisecond while the call runs; the result is the peak
  RSS minus the RSS just before the call. Before each such call ``gc.collect()`` and glibc's
  ``malloc_trim(0)`` return freed memory to the OS, so reuse of freed heap pages does not
  hide allocations. Short-lived peaks under ~1 ms can be missed, so this is a lower bound.
  Without ``/proc`` (not Linux) CPU memory is reported as n/a.

Memory is measured in up to five separate calls after the timed ones (the largest on CUDA, the
median on CPU, where RSS also moves with the C allocator's arenas), so the sampler does not disturb
the timings.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Case", "CaseResult", "Stats", "compare", "make_parser", "parse_args", "time_callable"]

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name) if _libc_name else None


@dataclass
class Stats:
    """Wall time (seconds) over the timed runs and peak memory growth (bytes) of one callable."""

    median_s: float
    iqr_s: float
    min_s: float
    runs: int
    peak_bytes: int | None


@dataclass
class Case:
    """One comparison: ``ours`` and ``baseline`` do the same work on the same input.

    ``target_time`` / ``target_memory`` are the largest acceptable ratios ours/baseline
    (``1.0``: ours must be no slower / no larger); ``None`` leaves that ratio unchecked.
    """

    name: str
    ours: Callable[[], object]
    baseline: Callable[[], object]
    description: str = ""
    target_time: float | None = 1.0
    target_memory: float | None = 1.0


@dataclass
class CaseResult:
    """Measurements and verdict for one :class:`Case` (what ``--json`` writes).

    Ratios are ours/baseline of the median time and of the peak memory growth; ``missed``
    lists the targets that were not met.
    """

    name: str
    description: str
    baseline: Stats
    ours: Stats
    target_time: float | None
    target_memory: float | None
    time_ratio: float = field(init=False)
    memory_ratio: float | None = field(init=False)
    missed: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.time_ratio = self.ours.median_s / self.baseline.median_s
        self.memory_ratio = _ratio(self.ours.peak_bytes, self.baseline.peak_bytes)
        self.missed = [
            f"{what} ratio {ratio:.2f} > target {target:.2f}"
            for what, ratio, target in [
                ("time", self.time_ratio, self.target_time),
                ("memory", self.memory_ratio, self.target_memory),
            ]
            if ratio is not None and target is not None and ratio > target
        ]

    @property
    def passed(self) -> bool:
        return not self.missed


def _ratio(ours: float | None, base: float | None) -> float | None:
    if ours is None or base is None:
        return None
    return ours / base if base > 0 else (1.0 if ours <= 0 else float("inf"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _read_rss(fd: int) -> int:
    return int(os.pread(fd, 128, 0).split()[1]) * _PAGE


def _cpu_peak(fn: Callable[[], object], interval: float = 1e-3) -> int | None:
    if not os.path.exists(_STATM):
        return None
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    fd = os.open(_STATM, os.O_RDONLY)
    try:
        before = peak = _read_rss(fd)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(interval):
                peak = max(peak, _read_rss(fd))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            stop.set()
            thread.join()
        return max(peak, _read_rss(fd)) - before
    finally:
        os.close(fd)


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory growth in bytes during one call of ``fn`` (see the module docstring)."""
    return _cuda_peak(fn, device) if device.type == "cuda" else _cpu_peak(fn)


def _stats(times: list[float], peak: int | None) -> Stats:
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return Stats(statistics.median(times), q3 - q1, min(times), len(times), peak)


def _peak_of_runs(peaks: list[int | None], device: torch.device) -> int | None:
    """CUDA: the largest peak (the allocator's count is exact). CPU: the median, because RSS
    growth also picks up the C allocator's per-thread arenas, which jump by tens of MiB from
    one run to the next regardless of what the callable allocates."""
    known = [p for p in peaks if p is not None]
    if not known:
        return None
    return max(known) if device.type == "cuda" else int(statistics.median(known))


def _measure(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, Stats]:
    """Warm up, time the callables interleaved, then measure each one's peak memory."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    keys = list(fns)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for i in range(repeats):  # alternate the order so that drift hits every callable alike
        for key in keys if i % 2 == 0 else keys[::-1]:
            times[key].append(_time_once(fns[key], device))
    memory_runs = min(repeats, 5)
    return {
        key: _stats(
            times[key], _peak_of_runs([peak_memory(fn, device) for _ in range(memory_runs)], device)
        )
        for key, fn in fns.items()
    }


def time_callable(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 10
) -> Stats:
    """Time ``fn`` after ``warmup`` untimed calls, then measure its peak memory growth."""
    return _measure({"fn": fn}, device, warmup, repeats)["fn"]


def _run_case(case: Case, device: torch.device, warmup: int, repeats: int) -> CaseResult:
    stats = _measure({"baseline": case.baseline, "ours": case.ours}, device, warmup, repeats)
    return CaseResult(
        case.name,
        case.description,
        stats["baseline"],
        stats["ours"],
        case.target_time,
        case.target_memory,
    )


def _fmt_time(s: Stats) -> str:
    return f"{s.median_s * 1e3:.1f}±{s.iqr_s * 1e3:.1f} ({s.min_s * 1e3:.1f}) ms"


def _fmt_mem(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def _print_row(r: CaseResult) -> None:
    cells = [
        r.name,
        _fmt_time(r.baseline),
        _fmt_time(r.ours),
        _fmt_ratio(r.time_ratio),
        _fmt_mem(r.baseline.peak_bytes),
        _fmt_mem(r.ours.peak_bytes),
        _fmt_ratio(r.memory_ratio),
        "PASS" if r.passed else "FAIL",
    ]
    print(_ROW.format(*cells), flush=True)


_HEAD = ("case", "baseline", "ours", "t ratio", "base peak", "our peak", "m ratio", "result")
_ROW = "{:<24} {:>25} {:>25} {:>7} {:>11} {:>11} {:>7} {:>6}"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, device, threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": name or platform.machine(),
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


def compare(
    cases: Iterable[Case],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 10,
    json_path: str | None = None,
    title: str = "",
) -> list[CaseResult]:
    """Run each case (baseline and ours interleaved), print a table and return the results.

    ``cases`` may be a generator, so that each case's inputs are built just before it runs
    and freed after. Ratios are ours/baseline: below 1 means ours is faster or smaller.
    """
    env = environment(device)
    print(f"{title}\n" if title else "", end="")
    print(
        f"torch {env['torch']} on {env['device']} ({env['device_name']}), "
        f"{env['threads']} threads; warmup {warmup}, repeats {repeats}; "
        f"time = median±IQR (min), peak = memory growth during one call"
    )
    print(_ROW.format(*_HEAD))
    results: list[CaseResult] = []
    for case in cases:
        results.append(_run_case(case, device, warmup, repeats))
        _print_row(results[-1])
    print()
    for r in results:
        if r.description:
            print(f"  {r.name}: {r.description}")
    missed = [r for r in results if not r.passed]
    if missed:
        print(f"\nMISSED TARGETS ({len(missed)} of {len(results)} cases):")
        for r in missed:
            print(f"  {r.name}: " + "; ".join(r.missed))
    else:
        print(f"\nAll {len(results)} cases met their targets.")
    if json_path:
        payload = {
            "environment": env,
            "warmup": warmup,
            "repeats": repeats,
            "results": [{**asdict(r), "passed": r.passed} for r in results],
        }
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {json_path}")
    return results


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark script shares; scripts may add their own."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="auto: cuda when available, else cpu (default)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 10; 1 quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (default 2; 1 quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (CI smoke run)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write results as JSON")
    return p


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``, fill in quick-dependent defaults and turn ``--device`` into a device."""
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    args.device = torch.device(args.device)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args
