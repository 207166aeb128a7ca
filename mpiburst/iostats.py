"""I/O counters of one process's open file, kept in memory and merged into the tier once, at close.

Each :class:`~mpiburst.writeback.TierFile` (under :class:`mpiburst.File` and
:func:`mpiburst.open`) owns a :class:`Recorder`. A write appends its offset
and size to :attr:`Recorder.calls` (two list appends, the only per-call
work); the writer counts them with numpy at once (:meth:`Recorder.digest`)
each time it sends a batch, between the sending and the wait for the
server's answer, so the count runs while the server stores the batch; and
at close. Writes too small to fill a batch soon count the list themselves
once it holds :data:`DIGEST_CALLS` calls. Records of one size take a quicker count
(only their offsets are converted). The time of writes is measured per batch
(sending it to the tier and waiting for it), not per call. A read, which always waits for the tier, adds its counters and time
directly. No server round trip is added. At close, :meth:`Recorder.merge`
adds the counters to the tier's with one store call
(:meth:`mpiburst.store.Store.stats_add`), under the file and the process
(``rank N`` under MPI, else ``pid N``). A flush records its BFS writes with
:func:`record_flush` (one store call, :meth:`~mpiburst.store.Store.stats_log`), a commit its
files with :func:`record_flushes` (one store call for all, :meth:`~mpiburst.store.Store.stats_log_many`).

The run's engine logs tier-fill samples (:class:`FillSampler`) and its sync
and purge events (:func:`log_event`) the same way, one store call each.

``MPIBURST_IOSTATS=0`` turns recording off (to measure its cost).

Counters of one direction (``write_`` or ``read_`` prefix): ``bytes``,
``calls``, ``ns`` (reads: time inside the calls; writes: time sending batches
to the tier and waiting for them, which the copy into the write-back buffer
is not part of), ``consecutive`` (the access starts
where the previous one of this handle ended; the first at offset 0 too),
``sequential`` (it starts further on: a forward gap), ``other`` (it starts
before), and ``hist_0`` .. ``hist_9``: calls per access size in Darshan's
bins (:data:`BINS`). Darshan's "sequential" count is consecutive + sequential.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import MpiburstError
from .store import BatchWriter, FileMeta, Store

#: Upper bounds (inclusive) of the access-size bins but the last, as Darshan's.
EDGES = (100, 1 << 10, 10 << 10, 100 << 10, 1 << 20, 4 << 20, 10 << 20, 100 << 20, 1 << 30)
#: Names of the access-size bins (Darshan's).
BINS = ("0-100", "100-1K", "1K-10K", "10K-100K", "100K-1M", "1M-4M", "4M-10M", "10M-100M",
        "100M-1G", "1G+")
#: Write calls :attr:`Recorder.calls` holds at most before they are digested into the counters (bounds its memory).
DIGEST_CALLS = 8192
#: Seconds between two tier-fill samples early in a run; later one per 1/1000 of the time run so far.
FILL_EVERY = 1.0


def enabled() -> bool:
    """Return whether recording is on (``MPIBURST_IOSTATS`` is not ``0``)."""
    return os.environ.get("MPIBURST_IOSTATS", "1") != "0"


def size_bin(n: int) -> int:
    """Return the index in :data:`BINS` of an access of ``n`` bytes."""
    return bisect_left(EDGES, n)


def process_name() -> str:
    """Name this process in the counters: ``rank N`` (MPI's world rank), else ``pid N``."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return f"rank {mpi.COMM_WORLD.Get_rank()}"
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return f"rank {os.environ[var]}"
    return f"pid {os.getpid()}"


#: Up to this many write calls are counted one by one (:meth:`_Direction.add_calls`), more in bulk with numpy.
_FEW_CALLS = 4


class _Direction:
    """The counters of one direction (writes or reads) of one handle."""

    __slots__ = ("bytes", "ns", "consecutive", "sequential", "other", "end", "hist")

    def __init__(self) -> None:
        self.bytes = self.ns = self.consecutive = self.sequential = self.other = self.end = 0
        self.hist = [0] * len(BINS)

    def add(self, offset: int, n: int, ns: int) -> None:
        self.hist[bisect_left(EDGES, n)] += 1
        self.bytes += n
        self.ns += ns
        end = self.end
        if offset == end:
            self.consecutive += 1
        elif offset > end:
            self.sequential += 1
        else:
            self.other += 1
        self.end = offset + n

    def add_calls(self, calls: list[int]) -> None:
        """Add the calls of a flat ``[offset, size, offset, size, ...]`` list (without time), all at once."""
        if len(calls) <= 2 * _FEW_CALLS:   # a small file's one write: numpy's set-up costs 3 us, this 0.2
            for i in range(0, len(calls), 2):
                self.add(calls[i], calls[i + 1], 0)
            return
        import numpy as np  # here: the server's processes import this module too, and need no numpy

        lengths = calls[1::2]
        n = lengths[0]
        if lengths.count(n) == len(lengths):   # records of one size (the common case): only offsets to convert
            starts = np.array(calls[0::2], dtype=np.int64)
            before = np.empty_like(starts)
            before[0] = self.end
            before[1:] = starts[:-1] + n
            self._add_pattern(starts, before)
            self.bytes += n * len(lengths)
            self.hist[bisect_left(EDGES, n)] += len(lengths)
            self.end = int(starts[-1]) + n
            return
        pairs = np.array(calls, dtype=np.int64).reshape(-1, 2)
        offsets, sizes = pairs[:, 0], pairs[:, 1]
        ends = offsets + sizes
        previous = np.empty_like(ends)
        previous[0] = self.end
        previous[1:] = ends[:-1]
        self._add_pattern(offsets, previous)
        self.bytes += int(sizes.sum())
        for i, c in enumerate(np.bincount(np.searchsorted(np.array(EDGES, dtype=np.int64), sizes), minlength=len(BINS)).tolist()):
            self.hist[i] += c
        self.end = int(ends[-1])

    def _add_pattern(self, offsets: Any, previous: Any) -> None:
        """Count the calls at ``offsets`` (numpy) as consecutive, sequential or other, each against ``previous`` end."""
        import numpy as np

        consecutive = int(np.count_nonzero(offsets == previous))
        sequential = int(np.count_nonzero(offsets > previous))
        self.consecutive += consecutive
        self.sequential += sequential
        self.other += len(offsets) - consecutive - sequential

    def counters(self, prefix: str) -> dict[str, int]:
        calls = sum(self.hist)
        if not calls:
            return {}
        out = {f"{prefix}calls": calls, f"{prefix}bytes": self.bytes, f"{prefix}ns": self.ns,
               f"{prefix}consecutive": self.consecutive, f"{prefix}sequential": self.sequential,
               f"{prefix}other": self.other}
        out.update({f"{prefix}hist_{i}": c for i, c in enumerate(self.hist) if c})
        return out


class Recorder:
    """The counters of one process's open file (see the module's docstring)."""

    __slots__ = ("writes", "reads", "calls")

    def __init__(self) -> None:
        self.writes = _Direction()
        self.reads = _Direction()
        #: Write calls not yet counted, ``[offset, size, ...]``; the writer appends, then calls :meth:`digest`.
        self.calls: list[int] = []

    def digest(self) -> None:
        """Count the write calls in :attr:`calls` and empty it (the same list object stays)."""
        self.writes.add_calls(self.calls)
        del self.calls[:]

    def counters(self) -> dict[str, int]:
        """Return every nonzero counter, named as in the tier."""
        self.digest()
        return {**self.writes.counters("write_"), **self.reads.counters("read_")}

    def merge(self, store: Store | BatchWriter, path: str) -> None:
        """Add the counters to the tier's for ``path`` and this process (one store call), then zero them.

        Given the handle's :class:`~mpiburst.store.BatchWriter` with its last
        batch in flight, the counters travel with that batch (no round trip
        of their own).
        """
        counters = self.counters()
        if counters:
            store.stats_add(path, process_name(), counters)
        self.writes = _Direction()
        self.reads = _Direction()


def record_flush(store: Store, report: Any, align: int, rank: int, started: float) -> None:
    """Log one finished flush in the tier (rank 0 only; one store call).

    ``report`` is the flush's :class:`~mpiburst.flush.FlushReport`; ``started``
    its start on the wall clock (``time.time()``).
    """
    if rank == 0:
        record_flushes(store, [report], align, started)


def record_flushes(store: Store, reports: Sequence[Any], align: int, started: float) -> None:
    """Log the finished flushes ``reports`` (a commit's files) in the tier, in one store call.

    ``started``: their start on the wall clock (``time.time()``); see :func:`record_flush`.
    """
    if not reports or not enabled():
        return
    events = [{"kind": "flush", "path": report.path, "start": started, "seconds": report.seconds,
               "bytes": report.bytes, "writes": report.writes, "align": align,
               "aligned_writes": sum(c for s, c in report.write_sizes.items() if s % align == 0),
               "sizes": {str(s): c for s, c in report.write_sizes.items()}} for report in reports]
    with contextlib.suppress(MpiburstError):   # the flush is done: a lost server must not say it failed
        store.stats_log_many(events)


def stats_path(directory: str, run_id: str) -> str:
    """Return where a stopped run's statistics are saved: ``mpiburst_<id>.stats.json`` in its run directory.

    ``server.stop_run`` writes it (mode 0600) before the server goes, so
    ``mpiburst report`` can still read the run afterwards (:func:`load_stats`).
    """
    return os.path.join(directory, f"mpiburst_{run_id}.stats.json")


def dump_stats(stats: tuple[dict[str, Any], list[dict[str, Any]]]) -> str:
    """Return a run's statistics (as :meth:`mpiburst.store.Store.stats` gives them) as the saved file's JSON."""
    return json.dumps({"counters": stats[0], "log": stats[1]}) + "\n"


def load_stats(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return the statistics saved in ``path`` (see :func:`stats_path`) as :meth:`~mpiburst.store.Store.stats` does."""
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return saved["counters"], saved["log"]


def log_event(store: Store, kind: str, **fields: Any) -> None:
    """Log one event of the run (``kind``, the wall-clock time ``t`` and ``fields``) in the tier; one store call.

    Recording is best effort: a lost server does not fail the caller.
    """
    with contextlib.suppress(MpiburstError):
        store.stats_log({"kind": kind, "t": time.time(), **fields})


def dirty_bytes(store: Store, dirty: Iterable[FileMeta]) -> int:
    """Return the bytes of the batches of ``dirty`` files holding data not yet on the BFS.

    A batch with one such extent counts whole, and data overwritten in the
    tier counts once per write: an upper bound of what a sync writes.
    """
    return sum(b.bytes for meta in dirty for b in store.blobs(meta.path, lo_seq=meta.clean + 1))


class FillSampler:
    """When and what the engine logs about the tier's fill: a ``fill`` event (see ``docs/report.md``).

    A sample is due every :data:`FILL_EVERY` seconds, and once the run is
    older than 1000 of those, every 1/1000 of its age: a day-long run logs
    about 5,500 samples (some 700 KB in the tier), not 86,400.
    """

    def __init__(self, every: float = FILL_EVERY) -> None:
        self.every = every
        self.first: float | None = None
        self.last: float | None = None

    def due(self, now: float) -> bool:
        """Return whether a sample is due at ``now`` (``time.time()``)."""
        if self.first is None or self.last is None:
            return True
        return now - self.last >= max(self.every, (now - self.first) / 1000)

    def log(self, store: Store, used: int, capacity: int, dirty: list[FileMeta],
            traffic: tuple[int, int] | None, now: float | None = None) -> None:
        """Log one sample: memory ``used`` of ``capacity``, the dirty files and bytes, the server's traffic.

        ``traffic`` is the server's total bytes received and sent (INFO
        stats), from which the report draws the absorb rate; None if unknown.
        """
        now = time.time() if now is None else now
        if self.first is None:
            self.first = now
        self.last = now
        event: dict[str, Any] = {"used": used, "capacity": capacity, "dirty_files": len(dirty),
                                 "dirty_bytes": dirty_bytes(store, dirty)}
        if traffic is not None:
            event["net_in"], event["net_out"] = traffic
        with contextlib.suppress(MpiburstError):
            store.stats_log({"kind": "fill", "t": now, **event})
