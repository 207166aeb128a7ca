"""The current bytes of a file's range ``[lo, hi)``: the tier's extents, newest first, over the BFS file's bytes.

One assembler serves every reader, so they can never disagree about what a
file holds: :meth:`mpiburst.writeback.TierFile.read`, each batch of a flush
(:mod:`mpiburst.flush`), the drain's chunks (:mod:`mpiburst.drain`) and
``mpiburst cat`` (:func:`mpiburst.residency.read`).

The tier's bytes land in the caller's buffer in place
(:meth:`mpiburst.store.Store.fetch_into`: on a real server, ``GETRANGE``
replies received straight into it, the newest write winning byte for byte);
only the holes no extent covers are read from the BFS file, below the offset
past which its bytes are stale (a pending truncation), and zeros fill the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

from .overlay import Entry, gaps
from .store import Store


class BfsBytes:
    """The bytes of a file's BFS copy that a range may fall back on, opened on first need.

    Parameters
    ----------
    path
        The BFS file to open (read-only) when a hole must be filled; a
        missing file reads as empty. Closed by :meth:`close`.
    fd
        An open descriptor to read instead (left open: it is the caller's).
    limit
        Bytes at or past this offset are stale and read as zeros (None: none).
    """

    def __init__(self, path: str | None = None, fd: int | None = None, limit: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.limit = limit
        self._opened = False

    def read_into(self, out: memoryview, offset: int) -> int:
        """Fill ``out`` from ``offset``; return the bytes read (fewer at the end of file or at ``limit``)."""
        want = len(out) if self.limit is None else max(0, min(len(out), self.limit - offset))
        fd = self._open() if want else None
        if fd is None:
            return 0
        done = 0
        while done < want:
            n = os.preadv(fd, [out[done:want]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def _open(self) -> int | None:
        """Return the descriptor to read, opening the file on first need; None where there is no file."""
        if self.fd is None and self.path is not None and not self._opened:
            self._opened = True
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                self.path = None
        return self.fd

    def close(self) -> None:
        """Close the file if this object opened it."""
        if self._opened and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BfsBytes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def current_bytes(store: Store, path: str, lo: int, out: memoryview, *, extents: Sequence[Entry] | None = None,
                  upto: int | None = None, bfs: BfsBytes | None = None) -> bool:
    """Fill ``out`` with the current bytes of ``[lo, lo + len(out))`` of ``path``.

    Parameters
    ----------
    store
        The tier's store.
    extents
        The extents overlapping the range, if the caller listed them already
        (a read's :meth:`~mpiburst.store.Store.window`, a flush's batch);
        else they are listed here, strided runs unexpanded
        (:meth:`~mpiburst.store.Store.index`: a flush batch costs per run, not per block).
    upto
        Only extents with ``seq <= upto`` count (a flush's snapshot); applied
        when the extents are listed here.
    bfs
        Where the bytes no extent covers come from; None: zeros.

    Returns
    -------
    bool
        False if an extent's bytes vanished from the tier meanwhile (a purge
        freed them): ``out`` is incomplete and the caller must look again or
        give up.
    """
    hi = lo + len(out)
    if extents is None:
        extents = store.index(path, lo, hi, upto=upto)
    if not store.fetch_into(path, extents, lo, out):
        return False
    for a, b in gaps(lo, hi, extents):
        got = bfs.read_into(out[a - lo:b - lo], a) if bfs is not None else 0
        out[a - lo + got:b - lo] = bytes(b - a - got)
    return True
