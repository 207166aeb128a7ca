"""Timing and memory sampling shared by every benchmark method.

A phase is timed the way IOR times it: all ranks start together after a
barrier, each measures its own wall time, and the phase lasts as long as the
slowest rank (max over ranks). Client memory is sampled from
``/proc/self/statm`` by a background thread, so C-level buffers (hiredis,
MPI) count too and the timed code runs without tracemalloc's overhead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


def collective_time(comm: Any, phase: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``phase`` on every rank after a barrier; return (seconds of the slowest rank, phase's result)."""
    from mpi4py import MPI

    comm.Barrier()
    t0 = MPI.Wtime()
    result = phase()
    elapsed = MPI.Wtime() - t0
    return comm.allreduce(elapsed, op=MPI.MAX), result


def _rss_bytes() -> int:
    """Return this process's resident set size in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager measuring the peak resident memory above the level at entry.

    Samples every ``interval`` seconds (a spike shorter than that can be
    missed); :attr:`peak` holds the growth in bytes after exit.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._base = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes() - self._base)

    def __enter__(self) -> PeakRSS:
        self._base = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self._base)
