"""Peak resident memory of a whole process tree, sampled from outside (Linux ``/proc``).

A process's own ``VmHWM`` misses its children (torchrun ranks, an ONNX Runtime probe run with ``-m``) and a
``ru_maxrss`` of children only counts those that ended. :class:`TreePeakSampler` polls the summed RSS of a process
and all its descendants in a background thread and keeps the largest sum seen.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["TreePeakSampler", "available_memory_bytes", "tree_rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return kids


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0  # the process ended between listing and reading


def tree_rss_bytes(pid: int) -> int:
    """The summed resident set size of ``pid`` and every descendant, now."""
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _rss(current)
        todo += _children(current)
    return total


class TreePeakSampler:
    """Context manager sampling :func:`tree_rss_bytes` of ``pid`` every ``interval`` seconds; ``peak`` holds the
    largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> "TreePeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
