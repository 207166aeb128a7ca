"""Assemble a byte range from overlapping extents: the newest sequence number wins, byte by byte.

Pure functions with no I/O, shared by tier-first reads and by the flush, so the
two can never disagree about which bytes a file holds.
"""

from __future__ import annotations

import heapq

from typing import Iterable, NamedTuple, Sequence


class Extent(NamedTuple):
    """One fragment of a file in the tier.

    ``seq`` orders fragments of one file (higher wins); ``start``/``length``
    place it in the file; ``blob``/``boff`` say where its bytes are stored;
    ``channel`` is the writer's channel.
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


def paint(lo: int, hi: int, extents: Sequence[Extent], payloads: Sequence[bytes | memoryview],
          out: bytearray | memoryview | None = None) -> tuple[bytearray | memoryview, list[tuple[int, int]]]:
    """Overlay ``extents`` (with their ``payloads``) onto the window ``[lo, hi)``.

    Extents are applied in increasing ``seq`` order, so a later write always
    wins over an earlier one at byte granularity.

    Parameters
    ----------
    lo, hi
        The window, in file offsets.
    extents, payloads
        Extents overlapping the window and their full bytes (same order).
    out
        A buffer of ``hi - lo`` bytes to paint into; a new zeroed one if None.

    Returns
    -------
    (buffer, gaps)
        The painted buffer and the sorted list of ``[a, b)`` file ranges inside
        the window that no extent covers (to be filled from the BFS or zeros).
    """
    if out is None:
        out = bytearray(hi - lo)
    order = sorted(range(len(extents)), key=lambda i: extents[i].seq)
    for i in order:
        e = extents[i]
        a, b = max(lo, e.start), min(hi, e.end)
        if a >= b:
            continue
        src = payloads[i]
        out[a - lo:b - lo] = src[a - e.start:b - e.start]
    return out, gaps(lo, hi, extents)


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
