"""Peak resident memory of this process, per stage (Linux: ``VmHWM``, reset through ``clear_refs``)."""
from __future__ import annotations

import time
from pathlib import Path


def peak_mb() -> float:
    """The process's peak RSS in MB since start or the last :func:`reset_peak` (NaN off Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn):
    """(fn(), its seconds, the process's peak RSS in MB while it ran)."""
    reset_peak()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start, peak_mb()
