"""File views: which file bytes a rank's data stream lands on.

A view (``MPI_File_set_view``) is a displacement, an etype and a filetype. The
filetype is tiled from the displacement, copy ``k`` at ``disp + k * extent``;
the bytes of its runs, tile after tile, form the rank's data stream, and
offsets and file pointers count etypes along that stream. :class:`View` maps
stream positions to file bytes and back, using the filetype's runs from
:mod:`mpiburst.datatypes`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from mpi4py import MPI

from .datatypes import Layout, layout

#: Runs of the filetype a slice of one transfer maps at a time (bounds the index arrays' memory).
RUNS_PER_CHUNK = 1 << 18


class View:
    """A file view: ``disp`` bytes, then the filetype tiled, offsets in etype units.

    Parameters
    ----------
    disp
        Absolute byte offset where the first tile starts (nonnegative).
    etype, filetype
        MPI datatypes; the filetype must be made of whole etypes, with
        nonnegative, nondecreasing displacements.

    Raises
    ------
    mpi4py.MPI.Exception
        ``ERR_ARG`` for a negative displacement or a filetype not made of
        etypes, ``ERR_IO`` for overlapping or decreasing filetype runs (the
        classes MPICH uses).
    """

    def __init__(self, disp: int = 0, etype: MPI.Datatype = MPI.BYTE, filetype: MPI.Datatype | None = None):
        filetype = etype if filetype is None else filetype
        if disp < 0:
            raise MPI.Exception(MPI.ERR_ARG)
        et, ft = layout(etype), layout(filetype)
        if et.size <= 0 or ft.size <= 0 or ft.size % et.size:
            raise MPI.Exception(MPI.ERR_ARG)
        if not ft.monotone:
            raise MPI.Exception(MPI.ERR_IO)
        self.disp = disp
        # MPI keeps its own copies: the caller may free its datatypes after Set_view
        self.etype, self.filetype = _own(etype), _own(filetype)
        self.esize = et.size
        self.ft: Layout = ft
        self.contiguous = ft.contiguous

    def datatypes(self) -> tuple[MPI.Datatype, MPI.Datatype]:
        """Return copies of the etype and filetype (the caller frees derived ones), as ``Get_view`` does."""
        return _own(self.etype), _own(self.filetype)

    def release(self) -> None:
        """Free the view's own copies of its datatypes."""
        for dt in (self.etype, self.filetype):
            if not dt.is_predefined and dt != MPI.DATATYPE_NULL:
                dt.Free()

    def byte_offset(self, pos: int) -> int:
        """Return the file byte of stream byte ``pos`` (the next data byte if ``pos`` ends a run)."""
        if self.contiguous:
            return self.disp + pos
        ft = self.ft
        tile, within = divmod(pos, ft.size)
        i = int(np.searchsorted(ft.cum, within, side="right")) - 1
        return self.disp + tile * ft.extent + int(ft.offs[i]) + within - int(ft.cum[i])

    def chunks(self, pos: int, n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, offsets, lengths)``: :meth:`pieces` of ``[pos, pos + n)`` in slices of bounded size.

        ``start`` is the slice's first byte relative to ``pos``. Each slice
        holds at most about :data:`RUNS_PER_CHUNK` runs, so a large transfer
        through a fine-grained filetype never builds arrays of every run.
        """
        if self.contiguous:
            yield 0, *self.pieces(pos, n)
            return
        step = max(1, RUNS_PER_CHUNK // max(len(self.ft.offs), 1)) * self.ft.size
        for start in range(0, n, step):
            yield start, *self.pieces(pos + start, min(step, n - start))

    def pieces(self, pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the file runs ``(offsets, lengths)`` of stream bytes ``[pos, pos + n)``, in stream order."""
        if n <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if self.contiguous:
            return np.array([self.disp + pos], np.int64), np.array([n], np.int64)
        ft = self.ft
        t0, t1 = pos // ft.size, (pos + n - 1) // ft.size
        tiles = np.arange(t0, t1 + 1, dtype=np.int64)[:, None]
        starts = (tiles * ft.size + ft.cum[None, :-1]).ravel()
        offs = (self.disp + tiles * ft.extent + ft.offs[None, :]).ravel()
        lens = np.broadcast_to(ft.lens[None, :], (len(tiles), len(ft.lens))).ravel()
        lo = np.maximum(starts, pos)
        hi = np.minimum(starts + lens, pos + n)
        keep = hi > lo
        offs, lo, hi, starts = offs[keep], lo[keep], hi[keep], starts[keep]
        offs = offs + (lo - starts)
        lens = hi - lo
        if len(offs) > 1:  # merge runs that touch across tiles (a contiguous view in disguise)
            first = np.flatnonzero(np.concatenate(([True], offs[1:] != offs[:-1] + lens[:-1])))
            if len(first) < len(offs):
                offs, lens = offs[first], np.add.reduceat(lens, first)
        return offs, lens

    def stream_before(self, byte: int) -> int:
        """Return how many stream bytes lie in the file before absolute byte ``byte``."""
        rel = byte - self.disp
        if rel <= 0:
            return 0
        if self.contiguous:
            return rel
        ft = self.ft
        first, last = int(ft.offs.min()), int((ft.offs + ft.lens).max())
        full = (rel - last) // ft.extent + 1 if rel >= last and ft.extent > 0 else 0
        count, tile = full * ft.size, full
        while tile * ft.extent + first < rel:  # the tiles that straddle ``byte``
            count += int(np.clip(rel - tile * ft.extent - ft.offs, 0, ft.lens).sum())
            tile += 1
            if ft.extent <= 0:
                break
        return count

    def eof_position(self, size: int) -> int:
        """Return the view offset (etypes) of the end of a file of ``size`` bytes, as ``SEEK_END`` uses it."""
        return -(-self.stream_before(size) // self.esize)


def _own(dt: MPI.Datatype) -> MPI.Datatype:
    """Return ``dt`` if predefined, else a committed duplicate of it."""
    return dt if dt.is_predefined else dt.Dup().Commit()
