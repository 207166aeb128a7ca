"""Extents of a file in the tier and pure functions over them: the holes they leave, the bytes still visible.

No I/O here: :mod:`mpiburst.assembly` assembles the bytes themselves, and the
stores (:mod:`mpiburst.store`) paint extents newest-last.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np


class Extent(NamedTuple):
    """One fragment of a file in the tier.

    ``seq`` orders fragments of one file (higher wins); ``start``/``length``
    place it in the file; ``blob``/``boff`` say which batch holds its bytes
    and where in it.
    """

    seq: int
    start: int
    length: int
    blob: int
    boff: int

    @property
    def end(self) -> int:
        """The file offset one past the fragment's last byte."""
        return self.start + self.length


class Strided(NamedTuple):
    """A strided run in the tier: ``nblocks`` blocks of ``length`` bytes, ``stride`` bytes apart in the file.

    The compact index entry of a regular pattern (a vector or subarray view,
    or records written at a fixed stride): block ``i`` covers
    ``[start + i * stride, start + i * stride + length)`` and its bytes lie at
    ``boff + i * length`` in blob ``blob``, packed. The blocks never overlap
    (``stride >= length``) and share one sequence number ``seq``.
    """

    seq: int
    start: int
    length: int
    blob: int
    boff: int
    nblocks: int
    stride: int

    @property
    def end(self) -> int:
        """The file offset one past the last block's last byte."""
        return self.start + (self.nblocks - 1) * self.stride + self.length

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """Return the blocks ``[i, j)`` that overlap ``[lo, hi)`` (``i >= j``: none)."""
        i = max(0, (lo - self.start - self.length) // self.stride + 1)
        j = min(self.nblocks, (hi - 1 - self.start) // self.stride + 1) if hi > self.start else 0
        return i, j

    def blocks(self, lo: int | None = None, hi: int | None = None) -> list[Extent]:
        """Return the blocks (overlapping ``[lo, hi)``, default all) as plain extents, in offset order."""
        i, j = (0, self.nblocks) if lo is None or hi is None else self.span(lo, hi)
        s, ln, st, b, bo = self.seq, self.length, self.stride, self.blob, self.boff
        return [Extent(s, self.start + k * st, ln, b, bo + k * ln) for k in range(i, j)]


#: An entry of a file's index: one fragment, or a strided run of them.
Entry = Extent | Strided


def expand(entries: Iterable[Entry], lo: int | None = None, hi: int | None = None) -> list[Extent]:
    """Return ``entries`` with every strided run replaced by its blocks (those overlapping ``[lo, hi)``)."""
    out: list[Extent] = []
    for e in entries:
        if isinstance(e, Strided):
            out.extend(e.blocks(lo, hi))
        else:
            out.append(e)
    return out


def overlapping(pieces: Sequence[Extent]) -> bool:
    """True if any two of ``pieces`` share a file byte."""
    end = -1
    for e in sorted(pieces, key=lambda e: e.start):
        if e.start < end:
            return True
        end = e.start + e.length
    return False


def bounds(lo: int, hi: int, entries: Iterable[Entry]) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(starts, ends)`` of every fragment of ``entries`` that overlaps ``[lo, hi)``, as arrays.

    A strided run's blocks are computed with numpy, not one Python object each.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    plain: list[tuple[int, int]] = []
    for e in entries:
        if isinstance(e, Strided):
            i, j = e.span(lo, hi)
            if i < j:
                s = e.start + np.arange(i, j, dtype=np.int64) * e.stride
                starts.append(s)
                ends.append(s + e.length)
        elif e.start < hi and e.start + e.length > lo:
            plain.append((e.start, e.start + e.length))
    if plain:
        pairs = np.array(plain, dtype=np.int64)
        starts.append(pairs[:, 0])
        ends.append(pairs[:, 1])
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(ends)


def gaps(lo: int, hi: int, extents: Iterable[Entry]) -> list[tuple[int, int]]:
    """Return the sorted ``[a, b)`` ranges of ``[lo, hi)`` that no extent (or block of a strided run) covers."""
    extents = list(extents)
    if any(isinstance(e, Strided) for e in extents):
        return _gaps_of(lo, hi, *bounds(lo, hi, extents))
    holes: list[tuple[int, int]] = []
    pos = lo
    for a, b in sorted((e.start, e.start + e.length) for e in extents):
        if a >= hi:
            break
        if a > pos:
            holes.append((pos, a))
        if b > pos:
            pos = b
    if pos < hi:
        holes.append((pos, hi))
    return holes


def _gaps_of(lo: int, hi: int, starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """:func:`gaps` over arrays of fragment bounds, vectorised (a sweep with a running maximum)."""
    if len(starts) == 0:
        return [(lo, hi)] if lo < hi else []
    order = np.argsort(starts, kind="stable")
    s = np.maximum(starts[order], lo)
    reach = np.maximum.accumulate(np.minimum(ends[order], hi))
    before = np.concatenate(([lo], reach[:-1]))      # covered up to here before fragment k
    hole = s > before
    holes = list(zip(before[hole].tolist(), s[hole].tolist()))
    if reach[-1] < hi:
        holes.append((int(reach[-1]), hi))
    return holes


def visible(extents: Sequence[Extent]) -> list[int]:
    """Return how many bytes of each extent are still visible (not shadowed by a newer one).

    Used to tell live data from superseded (deletable) data. A sweep over
    the extents' boundaries with a heap of the extents alive at each point:
    O(n log n) for n extents.
    """
    events = sorted({p for e in extents for p in (e.start, e.end)})
    starts = sorted(range(len(extents)), key=lambda k: extents[k].start)
    result = [0] * len(extents)
    alive: list[tuple[int, int]] = []  # (-seq, index)
    nxt = 0
    for a, b in zip(events, events[1:]):
        while nxt < len(starts) and extents[starts[nxt]].start <= a:
            k = starts[nxt]
            heapq.heappush(alive, (-extents[k].seq, k))
            nxt += 1
        while alive and extents[alive[0][1]].end <= a:
            heapq.heappop(alive)
        if alive:
            result[alive[0][1]] += b - a
    return result
