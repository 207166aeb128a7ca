"""Extents of a file in the tier and pure functions over them: the holes they leave, the bytes still visible.

No I/O here: :mod:`mpiburst.assembly` assembles the bytes themselves, and the
stores (:mod:`mpiburst.store`) paint extents newest-last.
"""

from __future__ import annotations

import heapq

from typing import Iterable, NamedTuple, Sequence


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


def gaps(lo: int, hi: int, extents: Iterable[Extent]) -> list[tuple[int, int]]:
    """Return the sorted ``[a, b)`` ranges of ``[lo, hi)`` that no extent covers."""
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
