"""MPI datatypes as flat byte layouts: (offset, length) runs, computed once per datatype.

``mpiburst.File`` never moves data through MPI: a datatype, whether it
describes a memory buffer or a file view's filetype, is turned into the list of
byte runs it covers, in type-map order, relative to the type's origin. The
constructor tree comes from ``Datatype.decode()`` and is walked recursively;
runs that touch are merged. A named type whose bytes have holes (``DOUBLE_INT``
and friends) is measured by packing byte indices with ``MPI.Pack``.

Runs are numpy ``int64`` arrays, so a vector of a million blocks costs two
arrays, not a million Python objects. :func:`layout` caches the result per
datatype object.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

#: Largest true extent (bytes) a datatype may have to be measured by packing.
PROBE_LIMIT = 64 << 20

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """The bytes one instance of a datatype covers.

    Attributes
    ----------
    size
        Bytes of data in one instance (``Get_size``).
    lb, extent
        Lower bound and extent (``Get_extent``): instance ``i`` of a count
        starts at ``i * extent`` from the origin.
    offs, lens
        The runs, in type-map order, offsets relative to the origin.
    """

    size: int
    lb: int
    extent: int
    offs: np.ndarray
    lens: np.ndarray
    cum: np.ndarray = field(init=False, repr=False)
    #: True when ``count`` instances are one run of ``count * size`` bytes from the origin.
    contiguous: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cum", np.concatenate(([0], np.cumsum(self.lens))).astype(np.int64))
        object.__setattr__(self, "contiguous", bool(self.lb == 0 and self.extent == self.size and (
            self.size == 0 or (len(self.offs) == 1 and self.offs[0] == 0))))

    @functools.cached_property
    def monotone(self) -> bool:
        """True when the runs are nonnegative and in nondecreasing, non-overlapping order (a legal filetype).

        Worked out once per layout (layouts are cached per datatype): every
        ``File.Open`` checks its default view's.
        """
        if len(self.offs) == 0:
            return True
        return bool(self.offs[0] >= 0 and np.all(self.offs[1:] >= self.offs[:-1] + self.lens[:-1]))

    def tiled(self, count: int, base: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Return the runs of ``count`` consecutive instances starting at byte ``base``."""
        if self.contiguous:
            n = count * self.size
            return (np.array([base], dtype=np.int64), np.array([n], dtype=np.int64)) if n else (_EMPTY, _EMPTY)
        offs, lens = _replicate(self.offs, self.lens, count, self.extent)
        return offs + base, lens


_named: dict[int, Layout] = {}
_derived: dict[int, tuple[weakref.ref, int, Layout]] = {}


def layout(dt: MPI.Datatype) -> Layout:
    """Return the :class:`Layout` of ``dt`` (cached per datatype object).

    Raises
    ------
    mpi4py.MPI.Exception
        ``ERR_TYPE`` for ``DATATYPE_NULL``.
    """
    handle = MPI._handleof(dt)
    if dt == MPI.DATATYPE_NULL:
        raise MPI.Exception(MPI.ERR_TYPE)
    if dt.is_predefined:
        hit = _named.get(handle)
        if hit is None:
            hit = _named[handle] = _build(dt)
        return hit
    entry = _derived.get(id(dt))
    if entry is not None and entry[0]() is dt and entry[1] == handle:
        return entry[2]
    out = _build(dt)
    ref = weakref.ref(dt, lambda _r, key=id(dt): _derived.pop(key, None))  # type: ignore[misc]  # noqa: B008 - binds the id now
    _derived[id(dt)] = (ref, handle, out)
    return out


def _build(dt: MPI.Datatype) -> Layout:
    lb, extent = dt.Get_extent()
    offs, lens = runs_of(dt)
    return Layout(dt.Get_size(), lb, extent, offs, lens)


def runs_of(dt: MPI.Datatype) -> tuple[np.ndarray, np.ndarray]:
    """Return the coalesced (offsets, lengths) runs of one instance of ``dt``, in type-map order."""
    base, combiner, p = dt.decode()
    if combiner == "NAMED":
        size = dt.Get_size()
        lb, extent = dt.Get_extent()
        if lb == 0 and extent == size:
            return _runs([0], [size])
        return probe(dt)
    if combiner in ("DUP", "RESIZED"):
        return runs_of(base)
    if combiner == "STRUCT":
        parts = [_block(t, bl, d) for t, bl, d in zip(p["datatypes"], p["blocklengths"], p["displacements"])]
        return _concat(parts)
    bext = base.Get_extent()[1]
    if combiner == "CONTIGUOUS":
        return _block(base, p["count"], 0)
    if combiner in ("VECTOR", "HVECTOR"):
        stride = p["stride"] * (bext if combiner == "VECTOR" else 1)
        offs, lens = _block(base, p["blocklength"], 0)
        return _coalesce(*_replicate(offs, lens, p["count"], stride))
    if combiner in ("INDEXED", "HINDEXED", "INDEXED_BLOCK", "HINDEXED_BLOCK"):
        disps = np.asarray(p["displacements"], dtype=np.int64)
        if combiner.startswith("INDEXED"):
            disps = disps * bext
        bls = p.get("blocklengths")
        bls = np.full(len(disps), p["blocklength"], dtype=np.int64) if bls is None else np.asarray(bls, np.int64)
        return _indexed(base, bls, disps)
    if combiner == "SUBARRAY":
        index = [np.arange(s, s + n, dtype=np.int64) for s, n in zip(p["starts"], p["subsizes"])]
        return _grid(base, p["sizes"], index, p["order"])
    if combiner == "DARRAY":
        coords = _coords(p["rank"], p["psizes"])
        index = [_owned(g, d, a, ps, c) for g, d, a, ps, c in
                 zip(p["gsizes"], p["distribs"], p["dargs"], p["psizes"], coords)]
        return _grid(base, p["gsizes"], index, p["order"])
    return probe(dt)


def probe(dt: MPI.Datatype) -> tuple[np.ndarray, np.ndarray]:
    """Measure ``dt``'s runs by packing a buffer whose bytes hold their own index.

    Independent of :func:`runs_of`'s reading of the constructor tree (the
    tests use it to check every constructor); costs memory proportional to
    the true extent, so it is limited to :data:`PROBE_LIMIT` bytes.
    """
    true_lb, true_extent = dt.Get_true_extent()
    size = dt.Get_size()
    if size == 0:
        return _EMPTY, _EMPTY
    if true_extent > PROBE_LIMIT:
        raise NotImplementedError(f"mpiburst cannot lay out this datatype ({dt.decode()[1]} combiner, "
                                  f"{true_extent} bytes wide); build it from the standard constructors.")
    shift = -true_lb
    width = shift + true_lb + true_extent
    inner = MPI.Datatype.Create_struct([1], [shift], [dt])
    wrapped = inner.Create_resized(0, width).Commit()
    try:
        index = np.arange(width, dtype=np.int64)
        found = np.zeros(size, dtype=np.int64)
        packed = bytearray(wrapped.Pack_size(1, MPI.COMM_SELF))
        for plane in range(4):
            src = ((index >> (8 * plane)) & 0xFF).astype(np.uint8)
            wrapped.Pack(src, packed, 0, MPI.COMM_SELF)
            found |= np.frombuffer(packed, dtype=np.uint8)[:size].astype(np.int64) << (8 * plane)
    finally:
        wrapped.Free()
        inner.Free()
    return _coalesce(found - shift, np.ones(size, dtype=np.int64))


# -- building blocks ----------------------------------------------------------------

def _runs(offs, lens) -> tuple[np.ndarray, np.ndarray]:
    return _coalesce(np.asarray(offs, dtype=np.int64), np.asarray(lens, dtype=np.int64))


def _coalesce(offs: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop empty runs and merge each run into its predecessor when it starts where that one ends."""
    keep = lens > 0
    if not keep.all():
        offs, lens = offs[keep], lens[keep]
    if len(offs) < 2:
        return offs.astype(np.int64), lens.astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], offs[1:] != offs[:-1] + lens[:-1])))
    if len(starts) == len(offs):
        return offs, lens
    return offs[starts], np.add.reduceat(lens, starts)


def _replicate(offs: np.ndarray, lens: np.ndarray, count: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``count`` copies of the runs, copy ``i`` shifted by ``i * stride`` bytes."""
    if count <= 0 or len(offs) == 0:
        return _EMPTY, _EMPTY
    shifts = np.arange(count, dtype=np.int64) * stride
    return (shifts[:, None] + offs[None, :]).ravel(), np.tile(lens, count)


def _block(dt: MPI.Datatype, count: int, disp: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of ``count`` consecutive ``dt`` at byte ``disp``."""
    lay = layout(dt)
    offs, lens = lay.tiled(count, disp)
    return _coalesce(offs, lens)


def _concat(parts) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return _EMPTY, _EMPTY
    return _coalesce(np.concatenate([o for o, _ in parts]), np.concatenate([n for _, n in parts]))


def _indexed(base: MPI.Datatype, bls: np.ndarray, disps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of blocks of ``bls[i]`` consecutive ``base`` at byte ``disps[i]``."""
    lay = layout(base)
    total = int(bls.sum()) if len(bls) else 0
    if total == 0:
        return _EMPTY, _EMPTY
    firsts = np.cumsum(bls) - bls
    elem = np.repeat(disps, bls) + (np.arange(total, dtype=np.int64) - np.repeat(firsts, bls)) * lay.extent
    if lay.contiguous:
        return _coalesce(elem, np.full(total, lay.size, dtype=np.int64))
    return _coalesce((elem[:, None] + lay.offs[None, :]).ravel(), np.tile(lay.lens, total))


def _grid(base: MPI.Datatype, sizes, index, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of the elements ``index[0] x index[1] x ...`` of an array of ``sizes`` (C or Fortran order)."""
    if order == MPI.ORDER_FORTRAN:
        sizes, index = list(sizes)[::-1], list(index)[::-1]
    strides = np.ones(len(sizes), dtype=np.int64)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    elem = np.zeros(1, dtype=np.int64)
    for d, idx in enumerate(index):
        elem = (elem[:, None] + (idx * strides[d])[None, :]).ravel()
    lay = layout(base)
    return _indexed(base, np.ones(len(elem), dtype=np.int64), elem * lay.extent)


def _coords(rank: int, psizes) -> list[int]:
    """Row-major coordinates of ``rank`` in a process grid of ``psizes`` (as MPI's darray defines them)."""
    coords = []
    for n in reversed(psizes):
        coords.append(rank % n)
        rank //= n
    return coords[::-1]


def _owned(gsize: int, distrib: int, darg: int, psize: int, coord: int) -> np.ndarray:
    """Global indices of one dimension a darray process owns, in increasing order."""
    if distrib == MPI.DISTRIBUTE_NONE:
        return np.arange(gsize, dtype=np.int64)
    if distrib == MPI.DISTRIBUTE_BLOCK:
        block = -(-gsize // psize) if darg == MPI.DISTRIBUTE_DFLT_DARG else darg
        return np.arange(coord * block, min((coord + 1) * block, gsize), dtype=np.int64)
    block = 1 if darg == MPI.DISTRIBUTE_DFLT_DARG else darg
    starts = np.arange(coord * block, gsize, psize * block, dtype=np.int64)
    idx = (starts[:, None] + np.arange(block, dtype=np.int64)[None, :]).ravel()
    return idx[idx < gsize]
