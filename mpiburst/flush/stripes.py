"""Stripe assembly: which stripes of a snapshot hold data to write, and their bytes.

A flusher walks the file's index (never its size, so holes cost nothing),
keeps the extents of the snapshot that are dirty, and merges the stripes they
touch into runs of adjacent stripes (:func:`dirty_runs`). The runs are cut
into batches of at most one write (:func:`batches`), and each batch is
assembled in a buffer from the tier's extents over the BFS file's bytes
(:func:`assemble_runs`).
"""

from __future__ import annotations

import heapq
from collections.abc import Generator, Iterator, Sequence

import numpy as np

from ..assembly import BfsBytes, current_bytes
from ..errors import FlushError
from ..overlay import Entry, Strided
from ..store import Store
from .snapshot import Plan


def dirty_runs(store: Store, plan: Plan, first: int, last: int,
               listed: Sequence[Entry] | None = None) -> Iterator[tuple[int, int]]:
    """Yield the runs ``[a, b)`` of adjacent stripes of ``[first, last)`` holding data to write, in order.

    A stripe is written when an extent of the snapshot in it is dirty (newer
    than the clean watermark), or, for a new file, when any extent lies in
    it. The runs come from a walk of the file's index (in pages, so memory
    stays bounded), never from the file's size: holes cost nothing. A
    strided run costs one step when its stride is at most a stripe (it then
    touches every stripe of its span), else one per stripe it touches.
    ``listed``: the index entries of ``[first, last)`` in offset order, if
    the caller listed them already (a small file's, for its one batch).
    """
    align = plan.align
    lo, hi = first * align, min(plan.size, last * align)
    run: list[int] | None = None
    ahead: list[tuple[int, int]] = []      # stripe runs of entries seen, not yet merged (a heap)
    for e in store.walk(plan.target, lo, hi) if listed is None else listed:
        if e.seq > plan.upto or not (plan.new or e.seq > plan.clean):
            continue
        while ahead and ahead[0][0] <= max(e.start, lo) // align:   # no later entry starts before these
            run = yield from _merge(run, heapq.heappop(ahead))
        for stripes in _stripes_of(e, lo, hi, align):
            heapq.heappush(ahead, stripes)
    while ahead:
        run = yield from _merge(run, heapq.heappop(ahead))
    if run is not None:
        yield run[0], run[1]


def _merge(run: list[int] | None, stripes: tuple[int, int]) -> Generator[tuple[int, int], None, list[int]]:
    """Add the stripes ``[a, b)`` to the open ``run``; yield the run when they do not touch it. Return the open run."""
    a, b = stripes
    if run is not None and a <= run[1]:
        run[1] = max(run[1], b)
        return run
    if run is not None:
        yield run[0], run[1]
    return [a, b]


def _stripes_of(e: Entry, lo: int, hi: int, align: int) -> list[tuple[int, int]]:
    """Return the runs of stripes ``[a, b)`` that entry ``e`` has bytes in, within ``[lo, hi)``."""
    if not isinstance(e, Strided):
        a, b = max(e.start, lo), min(e.start + e.length, hi)
        return [(a // align, (b - 1) // align + 1)] if a < b else []
    i, j = e.span(lo, hi)
    if i >= j:
        return []
    if e.stride <= align:                  # a block starts in every stripe of the span
        a, b = max(e.start + i * e.stride, lo), min(e.start + (j - 1) * e.stride + e.length, hi)
        return [(a // align, (b - 1) // align + 1)]
    starts = e.start + np.arange(i, j, dtype=np.int64) * e.stride
    a_s = np.maximum(starts, lo) // align
    b_s = (np.minimum(starts + e.length, hi) - 1) // align + 1
    return list(zip(a_s.tolist(), b_s.tolist()))


def batches(runs: list[tuple[int, int]], per: int) -> Iterator[list[tuple[int, int]]]:
    """Group stripe runs into batches of at most ``per`` stripes (a long run is cut into pieces)."""
    batch: list[tuple[int, int]] = []
    used = 0
    for a, b in runs:
        while a < b:
            take = min(b - a, per - used)
            batch.append((a, a + take))
            used += take
            a += take
            if used == per:
                yield batch
                batch, used = [], 0
    if batch:
        yield batch


def assemble_runs(store: Store, plan: Plan, runs: list[tuple[int, int]], src: int | None,
                   buf: memoryview, listed: Sequence[Entry] | None = None) -> list[tuple[int, memoryview]]:
    """Assemble the stripe ``runs`` (at most one buffer's worth) into ``buf``; return ``(offset, bytes)`` of each.

    ``listed``: the snapshot's index entries over every run (``seq <= plan.upto``),
    if the caller listed them already; else each run's are listed here.
    """
    align = plan.align
    out = []
    used = 0
    for a, b in runs:
        rlo, rhi = a * align, min(plan.size, b * align)
        view = buf[used:used + rhi - rlo]
        used += rhi - rlo
        bfs = BfsBytes(fd=src, limit=plan.base) if src is not None else None
        if not current_bytes(store, plan.target, rlo, view, extents=listed, upto=plan.upto, bfs=bfs):
            raise FlushError(f"the tier's bytes of {plan.target} in [{rlo}, {rhi}) vanished during the flush "
                             f"(purged meanwhile?); run it again.")
        out.append((rlo, view))
    return out
