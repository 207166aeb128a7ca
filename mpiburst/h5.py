"""h5py integration: HDF5 files whose bytes live in the burst tier.

* :class:`File` is an ``h5py.File`` over :func:`mpiburst.open` (h5py's
  file-object driver), with the usual h5py API, for one process: analysis
  codes read the newest data, whether flushed or still only in the tier.
* :func:`parallel_create` lets every rank of a communicator write one HDF5
  file with the serial h5py wheel: rank 0 lays the file out with contiguous,
  early-allocated, aligned datasets and broadcasts their offsets; every rank
  then writes its hyperslabs' bytes straight to those offsets through
  :class:`mpiburst.File`.

See ``docs/h5py.md`` for the limits.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    import h5py
except ImportError as exc:  # pragma: no cover - exercised by a test that hides h5py
    raise ImportError("mpiburst.h5 needs h5py; install it with 'pip install mpiburst[h5py]'.") from exc
import numpy as np

from .collective import on_root, together
from .errors import MpiburstError
from .fileobj import BurstIO
from .fileobj import open as burst_open
from .staging import host_array

if TYPE_CHECKING:   # mpi4py only for parallel use
    from mpi4py import MPI

    from .tier import Tier

# h5py mode -> (file object modes to try in order, h5py mode to use over the file object)
_MODES = {
    "r": (("rb",), "r"),
    "r+": (("r+b",), "r+"),
    "w": (("w+b",), "w"),
    "w-": (("x+b",), "w"),
    "x": (("x+b",), "w"),
    "a": (("r+b", "x+b"), None),  # None: "r+" if the file existed, else "w"
}

#: Keyword arguments of ``create_dataset`` that need chunked storage, and what to say about them.
_REFUSED = {
    "chunks": "chunked datasets",
    "compression": "compressed datasets",
    "compression_opts": "compressed datasets",
    "shuffle": "filtered (shuffle) datasets",
    "fletcher32": "filtered (fletcher32) datasets",
    "scaleoffset": "filtered (scale-offset) datasets",
    "maxshape": "resizable datasets",
}
_INSTEAD = ("write it from one process with mpiburst.h5.File, or gather the data to one rank and "
            "write it there")

_open_files: weakref.WeakSet[File] = weakref.WeakSet()


class File(h5py.File):
    """An ``h5py.File`` whose bytes live in the burst tier.

    Parameters
    ----------
    name
        ``burst://dir/file.h5``, ``burst:///abs/file.h5`` or a plain path
        inside the run's BFS root.
    mode
        h5py's modes: ``"r"``, ``"r+"``, ``"w"``, ``"w-"``/``"x"``, ``"a"``.
    comm
        Optional mpi4py communicator: the open becomes collective (a barrier
        first, so files other ranks closed before the call are seen). Only
        read-only opens may be shared by several ranks: HDF5 metadata written
        by several serial writers would collide (use :func:`parallel_create`).
    tier
        The run's :class:`~mpiburst.tier.Tier`; default :meth:`Tier.current`.
    buffer
        Write-back buffer size of the underlying file object.
    **kwargs
        Passed to ``h5py.File`` (``libver``, ``userblock_size``, alignment,
        ``track_order``, ...); ``driver`` cannot be chosen.

    Notes
    -----
    Closing the file closes the HDF5 file first and then the file object
    under it, also when the open fails, and at interpreter exit. When a
    ``File`` is only garbage collected, HDF5 keeps the file object alive
    until its last object is closed, so the order holds there too.
    """

    def __init__(self, name: str | os.PathLike, mode: str = "r", comm: MPI.Intracomm | None = None, *,
                 tier: Tier | None = None, buffer: str | int | None = None, **kwargs: Any) -> None:
        if mode not in _MODES:
            raise ValueError(f"mpiburst.h5.File: invalid mode {mode!r}; use 'r', 'r+', 'w', 'w-', 'x' or 'a'.")
        if "driver" in kwargs or "fileobj" in kwargs:
            raise ValueError("mpiburst.h5.File chooses the HDF5 driver itself (a file object over the tier); "
                             "leave out 'driver' and 'fileobj', or use h5py.File for files outside the tier.")
        if comm is not None:
            if mode != "r" and comm.Get_size() > 1:
                raise ValueError(f"mpiburst.h5.File cannot open {os.fspath(name)!r} for writing on "
                                 f"{comm.Get_size()} ranks (serial HDF5 metadata would collide); use "
                                 "mpiburst.h5.parallel_create for parallel writes, or open it on one rank.")
            comm.Barrier()
        fobj, h5mode = _open_fileobj(name, mode, tier, buffer)
        self._burst: BurstIO | None = fobj
        self._bfs_path = fobj.path
        self._name = fobj.name
        try:
            super().__init__(fobj, h5mode, **kwargs)
        except BaseException:
            self._burst = None
            fobj.close()
            raise
        _open_files.add(self)

    @property
    def filename(self) -> str:
        """The name the file was opened with (its ``burst://`` URL or path)."""
        return self._name

    @property
    def burst_path(self) -> str:
        """The absolute BFS path of the file."""
        return self._bfs_path

    def close(self) -> None:
        """Close the HDF5 file (every open object of it), then the file object under it."""
        try:
            super().close()
        finally:
            fobj, self._burst = getattr(self, "_burst", None), None
            if fobj is not None:
                fobj.close()
                _open_files.discard(self)


def _open_fileobj(name: str | os.PathLike, mode: str, tier: Any, buffer: Any) -> tuple[BurstIO, str]:
    """Open the tier file under an HDF5 file; return it and the h5py mode to use over it."""
    fmodes, h5mode = _MODES[mode]
    for i, fmode in enumerate(fmodes):
        try:
            fobj = burst_open(name, fmode, tier=tier, buffer=buffer)
        except (FileNotFoundError, FileExistsError):
            if i + 1 == len(fmodes):
                raise
            continue
        return fobj, h5mode or ("r+" if fmode.startswith("r") else "w")
    raise AssertionError("unreachable")  # pragma: no cover


@atexit.register
def _close_at_exit() -> None:
    """Close files left open at interpreter exit in the safe order (HDF5 first, then the file object)."""
    for f in list(_open_files):
        try:
            f.close()
        except Exception as exc:  # noqa: BLE001 - report and go on closing the others
            print(f"mpiburst.h5: closing {f.filename!r} at exit failed: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------- parallel writes

@dataclass(frozen=True)
class DatasetLayout:
    """Where a contiguous dataset's elements are in the file (row-major)."""

    offset: int | None   # None for an empty dataset (no storage)
    shape: tuple[int, ...]
    dtype: np.dtype


def parallel_create(name: str | os.PathLike, comm: MPI.Intracomm, datasets: Mapping[str, Any],
                    attrs: Mapping[str, Mapping[str, Any]] | None = None,
                    align: int | None = None) -> ParallelFile:
    """Create an HDF5 file that every rank of ``comm`` then writes (collective).

    Rank 0 creates the groups, the datasets (contiguous, allocated at
    creation, never filled) and the attributes with h5py over the tier, with
    datasets of at least ``align`` bytes starting at multiples of ``align``;
    it broadcasts where each dataset lies, and every rank opens the file with
    :class:`mpiburst.File` to write its parts with :meth:`ParallelFile.write`.

    Parameters
    ----------
    name
        ``burst://`` URL or path inside the run's BFS root; an existing file
        is replaced.
    comm
        The mpi4py communicator of the writing ranks.
    datasets
        ``{"path/in/file": (shape, dtype)}``, or ``{"path": {"shape": ...,
        "dtype": ..., "attrs": {...}}}``. Chunked, compressed, filtered or
        resizable datasets and variable-length, object or reference dtypes are
        refused (``ValueError``): their bytes cannot be placed by offset.
    attrs
        ``{"object path": {"attr": value}}``, ``"/"`` for the file; written by
        rank 0.
    align
        Dataset alignment in bytes; default the tier's flush alignment,
        ``1`` for none.

    Returns
    -------
    ParallelFile
        On every rank.

    Raises
    ------
    ValueError
        On every rank, for a refused dataset spec.
    MpiburstError
        On every rank, if rank 0 could not create the file.
    """
    from .tier import Tier

    specs = {path: _dataset_spec(path, spec) for path, spec in datasets.items()}

    def create() -> dict[str, DatasetLayout]:
        step = align if align is not None else Tier.current().align
        return _create_layout(name, specs, attrs or {}, max(int(step), 1))

    return ParallelFile(name, comm, on_root(comm, create))   # rank 0's failure raises on every rank


def _dataset_spec(path: str, spec: Any) -> tuple[tuple[int, ...], np.dtype, Mapping[str, Any]]:
    """Return ``(shape, dtype, attrs)`` of one dataset spec, refusing what cannot be written by offset."""
    if isinstance(spec, Mapping):
        for key in spec:
            if key in _REFUSED and spec[key] not in (None, False):
                raise ValueError(f"dataset {path!r}: parallel_create cannot write {_REFUSED[key]} "
                                 f"(their bytes have no fixed offsets); {_INSTEAD}.")
            if key not in ("shape", "dtype", "attrs") and key not in _REFUSED:
                raise ValueError(f"dataset {path!r}: unknown key {key!r}; give 'shape', 'dtype' and 'attrs'.")
        shape, dtype, attrs = spec.get("shape"), spec.get("dtype", "f8"), spec.get("attrs", {})
    else:
        shape, dtype = spec
        attrs = {}
    if shape is None:
        raise ValueError(f"dataset {path!r}: give its shape.")
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    dt = np.dtype(dtype)
    if dt.hasobject:
        kind = ("variable-length" if _has_vlen(dt)
                else "reference" if h5py.check_ref_dtype(dt) is not None else "object")
        raise ValueError(f"dataset {path!r}: parallel_create cannot write {kind} data ({dt}), whose bytes "
                         f"live outside the dataset; use a fixed-size dtype (e.g. 'S16') or {_INSTEAD}.")
    return shape, dt, attrs


def _has_vlen(dt: np.dtype) -> bool:
    """True if ``dt`` or any field of it is an h5py variable-length type."""
    string = h5py.check_string_dtype(dt)
    if h5py.check_vlen_dtype(dt) is not None or (string is not None and string.length is None):
        return True
    return dt.fields is not None and any(_has_vlen(f[0]) for f in dt.fields.values())


def _create_layout(name: str | os.PathLike, specs: Mapping[str, tuple], attrs: Mapping[str, Mapping[str, Any]],
                   align: int) -> dict[str, DatasetLayout]:
    """Create the file's structure on this process (rank 0); return each dataset's layout."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    options: dict[str, Any] = dict(alignment_threshold=align, alignment_interval=align) if align > 1 else {}
    layout = {}
    with File(name, "w", **options) as f:
        for path, (shape, dtype, dattrs) in specs.items():
            dset = f.create_dataset(path, shape=shape, dtype=dtype, dcpl=dcpl)
            dset.attrs.update(dattrs)
            nbytes = math.prod(shape) * dset.dtype.itemsize
            offset = None
            if nbytes:
                # With a userblock, get_offset() of unallocated storage can be wrong: check allocation first.
                if dset.id.get_storage_size() < nbytes or dset.id.get_offset() is None:
                    raise MpiburstError(f"HDF5 did not allocate dataset {path!r} at creation; "
                                        "report this with your h5py and HDF5 versions.")
                offset = dset.id.get_offset()
            layout[path] = DatasetLayout(offset, shape, dset.dtype)
        for path, values in attrs.items():
            f[path].attrs.update(values)
    return layout


class ParallelFile:
    """An HDF5 file laid out by :func:`parallel_create`, open on every rank for writing.

    Attributes
    ----------
    datasets : dict[str, DatasetLayout]
        Offset, shape and dtype of every dataset.
    """

    def __init__(self, name: str | os.PathLike, comm: MPI.Intracomm, layout: dict[str, DatasetLayout]) -> None:
        from mpi4py import MPI

        from .file import File as BurstFile
        from .paths import is_burst

        self.name = os.fspath(name)
        self.comm = comm
        self.datasets = layout
        url = self.name if is_burst(self.name) else "burst://" + os.path.abspath(self.name)
        self._url = url
        self._fh: BurstFile | MPI.File | None = BurstFile.Open(comm, url, MPI.MODE_WRONLY)

    def write(self, name: str, selection: Any, array: Any) -> None:
        """Write ``array`` into the hyperslab ``selection`` of dataset ``name`` (collective).

        Every rank calls it for the same dataset, each with its own part
        (``selection=None`` for none). ``selection`` is what NumPy indexing
        takes for a box: a tuple of integers and step-1 slices, ``...``, or
        ``numpy.s_[a:b, c:d]``. ``array`` is converted to the dataset's dtype
        and must have the box's shape (or its number of elements); device
        arrays (``__cuda_array_interface__``, DLPack) are copied to the host
        first (:func:`mpiburst.staging.host_array`).

        Raises
        ------
        Exception
            On every rank when the write failed on any (a bad selection, a
            full tier): that rank's own exception; on the others the same
            mpiburst error, or a :class:`~mpiburst.errors.CollectiveError`
            naming the rank, its exception's type and message.
        """
        together(self.comm, lambda: self._write(name, selection, array))

    def _write(self, name: str, selection: Any, array: Any) -> None:
        """This rank's part of :meth:`write` (independent writes at the runs' offsets)."""
        try:
            dset = self.datasets[name]
        except KeyError:
            raise KeyError(f"no dataset {name!r} in {self.name}; created were {sorted(self.datasets)}") from None
        if selection is None or dset.offset is None:
            return
        fh = self._fh
        if fh is None:
            raise ValueError(f"{self.name} is closed; create it again with parallel_create to write more.")
        starts, counts, squeezed = hyperslab(dset.shape, selection)
        if hasattr(array, "__cuda_array_interface__") or hasattr(array, "__dlpack_device__"):
            array = host_array(array)      # device memory: a host copy (numpy converts and lays it out)
        data = np.ascontiguousarray(array, dtype=dset.dtype)
        if data.shape not in (tuple(counts), squeezed) and data.size != math.prod(counts):
            raise ValueError(f"array of shape {data.shape} does not fit selection {selection!r} of "
                             f"{name!r} (shape {tuple(counts)}).")
        flat = data.reshape(-1).view(np.uint8)
        offsets, length = byte_runs(dset.shape, dset.dtype.itemsize, starts, counts)
        for i, off in enumerate(offsets.tolist()):
            fh.Write_at(dset.offset + off, flat[i * length:(i + 1) * length])  # ranks differ in count

    def close(self, sync: bool = False) -> Any:
        """Close the file on every rank (collective); with ``sync``, flush it to the BFS.

        Returns the :class:`~mpiburst.flush.FlushReport` with ``sync``, else None.
        """
        if self._fh is None:
            return None
        fh, self._fh = self._fh, None
        fh.Close()
        if sync:
            from .flush import sync as flush_sync

            return flush_sync(self._url, comm=self.comm)
        return None

    def __enter__(self) -> ParallelFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def hyperslab(shape: tuple[int, ...], selection: Any) -> tuple[list[int], list[int], tuple[int, ...]]:
    """Return ``(starts, counts, squeezed shape)`` of a box selection of an array of ``shape``.

    Integers select one index (and drop that axis from the squeezed shape),
    slices must have step 1, ``...`` stands for the missing axes.
    """
    sel = selection if isinstance(selection, tuple) else (selection,)
    if sum(s is Ellipsis for s in sel) > 1:
        raise ValueError("a selection may hold at most one '...'.")
    if Ellipsis in sel:
        i = sel.index(Ellipsis)
        sel = sel[:i] + (slice(None),) * (len(shape) - len(sel) + 1) + sel[i + 1:]
    sel = sel + (slice(None),) * (len(shape) - len(sel))
    if len(sel) != len(shape):
        raise ValueError(f"selection {selection!r} has more axes than the dataset's shape {shape}.")
    starts, counts, squeezed = [], [], []
    for axis, (s, n) in enumerate(zip(sel, shape)):
        if isinstance(s, slice):
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError(f"axis {axis}: parallel writes take step-1 slices only, not {s!r}; "
                                 "write each strided part as its own box.")
            starts.append(start)
            counts.append(max(0, stop - start))
            squeezed.append(counts[-1])
        elif isinstance(s, (int, np.integer)):
            k = int(s) + n if s < 0 else int(s)
            if not 0 <= k < n:
                raise IndexError(f"index {s} is out of range for axis {axis} of size {n}.")
            starts.append(k)
            counts.append(1)
        else:
            raise TypeError(f"axis {axis}: selection item {s!r} is not an integer, slice or '...'.")
    return starts, counts, tuple(squeezed)


def byte_runs(shape: tuple[int, ...], itemsize: int, starts: list[int], counts: list[int]) -> tuple[np.ndarray, int]:
    """Return the byte offsets (from the dataset's start) and common length of a box's contiguous runs.

    In a row-major array a box is a set of equal runs along its innermost
    partial axis; axes after it that the box covers fully are merged into
    the run, so a block of whole rows is one run. Runs are in row-major order,
    the order of the box's elements in a C-contiguous array.
    """
    if any(c == 0 for c in counts):
        return np.zeros(0, dtype=np.int64), 0
    nd = len(shape)
    if nd == 0:
        return np.zeros(1, dtype=np.int64), itemsize
    strides = [math.prod(shape[j + 1:]) for j in range(nd)]
    k = nd - 1
    while k > 0 and starts[k] == 0 and counts[k] == shape[k]:
        k -= 1
    length = counts[k] * strides[k] * itemsize
    offsets = np.array(starts[k] * strides[k], dtype=np.int64)
    for j in range(k):
        axis = (starts[j] + np.arange(counts[j], dtype=np.int64)) * strides[j]
        offsets = np.add.outer(offsets, axis) if j else axis + offsets
    return np.asarray(offsets, dtype=np.int64).reshape(-1) * itemsize, length
