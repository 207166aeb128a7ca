"""``mpiburst.File``: the names, signatures and errors of ``mpi4py.MPI.File``, backed by the tier.

Switch an application by changing one import and its paths: ``burst://``
paths go through the tier (each rank writes to its own channel; no data moves
between ranks), any other path is handed to ``mpi4py.MPI.File`` unchanged.
Consistency follows MPI's nonatomic mode and IME's close-to-open rule; see
``docs/consistency.md``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from .client import TierFile, buffer_size, register, store_of
from .errors import MpiburstError
from .paths import is_burst, resolve
from .tier import Tier

_ACCESS = MPI.MODE_RDONLY | MPI.MODE_WRONLY | MPI.MODE_RDWR


def _mpi_error(error_class: int) -> MPI.Exception:
    """Return the MPI exception mpi4py would raise for ``error_class``."""
    return MPI.Exception(error_class)


def _datatype(spec: Any) -> MPI.Datatype:
    """Return the MPI datatype for ``spec`` (a Datatype or a typecode, as mpi4py maps them)."""
    if isinstance(spec, MPI.Datatype):
        return spec
    try:
        return dtlib.from_numpy_dtype(spec)
    except (TypeError, ValueError):
        raise KeyError(f"cannot map {spec!r} to MPI datatype") from None


def _contiguous(dt: MPI.Datatype) -> int:
    """Return the size of ``dt`` if it is byte-contiguous, else refuse clearly."""
    size = dt.Get_size()
    lb, extent = dt.Get_extent()
    if lb != 0 or extent != size:
        raise NotImplementedError(
            "mpiburst.File supports contiguous datatypes only (size equal to extent, lower bound 0); "
            "pack non-contiguous data into a contiguous buffer first.")
    return size


def message(buf: Any, writable: bool) -> memoryview:
    """Return the bytes a buffer spec names, as a flat byte memoryview.

    Accepts what mpi4py accepts for file I/O: a buffer, ``[buf, datatype]``,
    ``[buf, count, datatype]``, ``[buf, (count, displ), datatype]`` and
    ``[buf, count, displ, datatype]``. Raises the exception types mpi4py
    raises for bad specs.
    """
    count = displ = None
    dtype = None
    if isinstance(buf, (list, tuple)):
        if not 2 <= len(buf) <= 4:
            raise ValueError("message: expecting 2 to 4 items")
        obj, dtype = buf[0], _datatype(buf[-1])
        if len(buf) == 3:
            count = buf[1]
            if isinstance(count, tuple):
                count, displ = count
        elif len(buf) == 4:
            count, displ = buf[1], buf[2]
    else:
        obj = buf
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError("message: expecting buffer or list/tuple") from None
    if writable and view.readonly:
        raise BufferError("Object is not writable.")
    if not view.contiguous:
        raise BufferError("buffer is not contiguous")
    if not view.c_contiguous:  # Fortran order: its bytes in memory order, as MPI.File takes them
        view = memoryview(np.asarray(view).T)
    raw = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if dtype is None:
        return raw
    size = _contiguous(dtype)
    start = (displ or 0) * size
    stop = len(raw) if count is None else start + count * size
    if stop > len(raw) or start < 0 or stop < start:
        raise ValueError("message: buffer is too small for the count and displacement given")
    return raw[start:stop]


class Request:
    """A completed request, as returned by the nonblocking calls.

    mpiburst's nonblocking calls finish before they return (writes land in the
    write-back buffer, reads are served at once), so ``Wait`` only fills the
    status. ``mpi4py.MPI.Request.Waitall`` does not take these objects; use
    :meth:`Request.Waitall`.
    """

    def __init__(self, nbytes: int):
        self._nbytes = nbytes

    def Wait(self, status: MPI.Status | None = None) -> bool:
        """Complete the request (already done) and fill ``status``."""
        _set_status(status, self._nbytes)
        return True

    def Test(self, status: MPI.Status | None = None) -> bool:
        """Return True (the request is complete) and fill ``status``."""
        return self.Wait(status)

    def Get_status(self, status: MPI.Status | None = None) -> bool:
        """Return True (the request is complete) and fill ``status``."""
        return self.Wait(status)

    def Free(self) -> None:
        """Release the request (nothing to release)."""

    @staticmethod
    def Waitall(requests, statuses=None) -> bool:
        """Complete every request in ``requests``."""
        for i, req in enumerate(requests):
            req.Wait(statuses[i] if statuses else None)
        return True


def _set_status(status: MPI.Status | None, nbytes: int) -> None:
    if status is not None:
        status.Set_elements(MPI.BYTE, nbytes)


class File:
    """A file of the burst tier with the interface of ``mpi4py.MPI.File``.

    Create it with :meth:`Open` (collective). Offsets are in etype units of
    the view (bytes by default). Unlike ``MPI.File``, a ``File`` is also a
    context manager that closes it (an addition; ``MPI.File`` is not one).
    """

    def __init__(self, comm: MPI.Comm, tier: Tier, path: str, amode: int, hints: dict[str, str]):
        self._comm = comm
        self._tier = tier
        self._amode = amode
        self._hints = hints
        rank = comm.Get_rank()
        self._tf: TierFile | None = TierFile(tier, path, rank % max(tier.channels, 1),
                                             buffer_size(hints.get("mpiburst_wr_buffer")))
        self._disp = 0
        self._etype: MPI.Datatype = MPI.BYTE
        self._filetype: MPI.Datatype = MPI.BYTE
        self._esize = 1
        self._atomic = False
        self._pos = 0
        if amode & MPI.MODE_APPEND:
            # Rank 0 reads the size before any rank can write (they wait for this bcast): all agree.
            self._pos = comm.bcast(self._tf.size() if rank == 0 else None, root=0)

    # -- open / close / delete ------------------------------------------------
    @classmethod
    def Open(cls, comm: MPI.Comm, filename: str | os.PathLike, amode: int = MPI.MODE_RDONLY,
             info: MPI.Info = MPI.INFO_NULL) -> "File | MPI.File":
        """Open ``filename`` collectively over ``comm``.

        Parameters
        ----------
        comm
            The communicator of the ranks that open the file.
        filename
            ``burst://dir/file`` (relative to the run's BFS root),
            ``burst:///abs/file``, or any other path (opened with
            ``mpi4py.MPI.File.Open`` and returned as an ``MPI.File``).
        amode
            ``MPI.MODE_*`` flags, as for ``MPI.File.Open``.
        info
            Hints; ``mpiburst_wr_buffer`` sets the write-back buffer size.

        Raises
        ------
        mpi4py.MPI.Exception
            With the error class MPI uses: ``ERR_AMODE``, ``ERR_FILE_EXISTS``,
            ``ERR_NO_SUCH_FILE``, ``ERR_UNSUPPORTED_OPERATION``.
        mpiburst.errors.PathError
            If the path resolves outside the run's BFS root.
        """
        if not is_burst(filename):
            return MPI.File.Open(comm, filename, amode, info)
        hints = _hints(info)
        tier = Tier.current()
        path = resolve(filename, tier.bfs_root)
        error: int | MpiburstError | None = _check_amode(amode)
        if error is None and comm.Get_rank() == 0:
            try:
                error = _open_on_rank0(tier, path, amode)
            except MpiburstError as exc:  # e.g. the server is gone: fail every rank, not only rank 0
                error = exc
        error = comm.bcast(error, root=0)
        if isinstance(error, MpiburstError):
            raise error
        if error is not None:
            raise _mpi_error(error)
        return cls(comm.Dup(), tier, path, amode, hints)

    def Close(self) -> None:
        """Push this rank's buffered writes and close the file (collective)."""
        tf = self._handle()
        self._collective(tf.close)
        if self._amode & MPI.MODE_DELETE_ON_CLOSE and self._comm.Get_rank() == 0:
            _delete(self._tier, tf.path)
        self._comm.Barrier()
        self._tf = None
        self._comm.Free()

    @classmethod
    def Delete(cls, filename: str | os.PathLike, info: MPI.Info = MPI.INFO_NULL) -> None:
        """Delete ``filename``: its tier data and its BFS file (``MPI.File.Delete`` for other paths)."""
        if not is_burst(filename):
            return MPI.File.Delete(filename, info)
        tier = Tier.current()
        path = resolve(filename, tier.bfs_root)
        if store_of(tier).meta(path) is None and not os.path.exists(path):
            raise _mpi_error(MPI.ERR_NO_SUCH_FILE)
        _delete(tier, path)

    def __enter__(self) -> "File":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close the file; after an exception, close only this rank's part.

        The other ranks may not be here (one rank's failed check must not
        leave it blocked in the collective ``Close``), so no collective runs:
        this rank's buffered writes are pushed and its connection released.
        """
        if self._tf is None:
            return
        if exc_type is None:
            self.Close()
            return
        tf, self._tf = self._tf, None
        tf.close()

    # -- writes -----------------------------------------------------------------
    def Write_at(self, offset: int, buf: Any, status: MPI.Status | None = None) -> None:
        """Write ``buf`` at ``offset`` (etype units of the view)."""
        self._write(self._byte_offset(offset), buf, status)

    def Write_at_all(self, offset: int, buf: Any, status: MPI.Status | None = None) -> None:
        """Collective form of :meth:`Write_at` (no data moves between ranks)."""
        self._write(self._byte_offset(offset), buf, status)

    def Write(self, buf: Any, status: MPI.Status | None = None) -> None:
        """Write ``buf`` at the individual file pointer and advance it."""
        self._pos += self._write(self._byte_offset(self._pos), buf, status) // self._esize

    def Write_all(self, buf: Any, status: MPI.Status | None = None) -> None:
        """Collective form of :meth:`Write`."""
        self.Write(buf, status)

    def Iwrite_at(self, offset: int, buf: Any) -> Request:
        """Nonblocking :meth:`Write_at`; the returned request is already complete."""
        return Request(self._write(self._byte_offset(offset), buf, None))

    def Iwrite_at_all(self, offset: int, buf: Any) -> Request:
        """Nonblocking :meth:`Write_at_all`."""
        return self.Iwrite_at(offset, buf)

    def Iwrite(self, buf: Any) -> Request:
        """Nonblocking :meth:`Write`."""
        nbytes = self._write(self._byte_offset(self._pos), buf, None)
        self._pos += nbytes // self._esize
        return Request(nbytes)

    def Write_at_all_begin(self, offset: int, buf: Any) -> None:
        """Begin a split collective write (completed by :meth:`Write_at_all_end`)."""
        self._split = self._write(self._byte_offset(offset), buf, None)

    def Write_at_all_end(self, buf: Any, status: MPI.Status | None = None) -> None:
        """End the split collective write begun with :meth:`Write_at_all_begin`."""
        _set_status(status, getattr(self, "_split", 0))

    def _write(self, byte_offset: int, buf: Any, status: MPI.Status | None) -> int:
        tf = self._handle()
        if not self._amode & (MPI.MODE_WRONLY | MPI.MODE_RDWR):
            raise _mpi_error(MPI.ERR_READ_ONLY)
        data = message(buf, writable=False)
        tf.write(byte_offset, data)
        if self._atomic:
            tf.push()
        _set_status(status, len(data))
        return len(data)

    # -- reads ------------------------------------------------------------------
    def Read_at(self, offset: int, buf: Any, status: MPI.Status | None = None) -> None:
        """Read into ``buf`` from ``offset``; the tier's bytes first, then the BFS's."""
        self._read(self._byte_offset(offset), buf, status)

    def Read_at_all(self, offset: int, buf: Any, status: MPI.Status | None = None) -> None:
        """Collective form of :meth:`Read_at`."""
        self._read(self._byte_offset(offset), buf, status)

    def Read(self, buf: Any, status: MPI.Status | None = None) -> None:
        """Read at the individual file pointer and advance it."""
        self._pos += self._read(self._byte_offset(self._pos), buf, status) // self._esize

    def Read_all(self, buf: Any, status: MPI.Status | None = None) -> None:
        """Collective form of :meth:`Read`."""
        self.Read(buf, status)

    def Iread_at(self, offset: int, buf: Any) -> Request:
        """Nonblocking :meth:`Read_at`; the returned request is already complete."""
        return Request(self._read(self._byte_offset(offset), buf, None))

    def Iread(self, buf: Any) -> Request:
        """Nonblocking :meth:`Read`."""
        nbytes = self._read(self._byte_offset(self._pos), buf, None)
        self._pos += nbytes // self._esize
        return Request(nbytes)

    def _read(self, byte_offset: int, buf: Any, status: MPI.Status | None) -> int:
        tf = self._handle()
        if not self._amode & (MPI.MODE_RDONLY | MPI.MODE_RDWR):
            raise _mpi_error(MPI.ERR_ACCESS)
        target = message(buf, writable=True)
        nbytes = tf.read(byte_offset, target)
        _set_status(status, nbytes)
        return nbytes

    # -- position, size, view -----------------------------------------------------
    def Seek(self, offset: int, whence: int = MPI.SEEK_SET) -> None:
        """Move the individual file pointer (etype units; ``MPI.SEEK_SET/CUR/END``)."""
        if whence == MPI.SEEK_SET:
            pos = offset
        elif whence == MPI.SEEK_CUR:
            pos = self._pos + offset
        elif whence == MPI.SEEK_END:
            pos = (self.Get_size() - self._disp) // self._esize + offset
        else:
            raise _mpi_error(MPI.ERR_ARG)
        if pos < 0:
            raise _mpi_error(MPI.ERR_ARG)
        self._pos = pos

    def Get_position(self) -> int:
        """Return the individual file pointer, in etype units."""
        return self._pos

    def Get_byte_offset(self, offset: int) -> int:
        """Return the absolute byte offset of view offset ``offset``."""
        return self._byte_offset(offset)

    def Get_size(self) -> int:
        """Return the file's size in bytes (tier and BFS, after truncations)."""
        return self._handle().size()

    def Set_size(self, size: int) -> None:
        """Truncate or extend the file to ``size`` bytes (collective)."""
        if size < 0:
            raise _mpi_error(MPI.ERR_ARG)
        tf = self._handle()
        self._collective(tf.push)
        if self._comm.Get_rank() == 0:
            tf.set_size(size)
        self._comm.Barrier()

    def Preallocate(self, size: int) -> None:
        """Make the file at least ``size`` bytes long (collective)."""
        tf = self._handle()
        self._collective(tf.push)
        if self._comm.Get_rank() == 0 and tf.size() < size:
            tf.set_size(size)
        self._comm.Barrier()

    def Sync(self) -> None:
        """Push this rank's buffered writes to the tier (collective).

        After the writer's ``Sync``, a barrier and the reader's ``Sync``, the
        reader sees the data (MPI's sync-barrier-sync). Durability on the BFS
        is :func:`mpiburst.sync`.
        """
        self._collective(self._handle().push)

    def Set_view(self, disp: int = 0, etype: MPI.Datatype = MPI.BYTE, filetype: MPI.Datatype | None = None,
                 datarep: str = "native", info: MPI.Info = MPI.INFO_NULL) -> None:
        """Set the view: a displacement and a contiguous etype (and a filetype equal to it)."""
        self._handle()
        esize = _contiguous(_datatype(etype))
        if filetype is not None and _contiguous(_datatype(filetype)) % esize:
            raise NotImplementedError("mpiburst.File supports views whose filetype is contiguous "
                                      "and made of whole etypes only.")
        if datarep != "native":
            raise NotImplementedError(f"mpiburst.File supports the 'native' data representation only, not {datarep!r}.")
        self.Sync()
        self._disp, self._etype, self._esize = disp, etype, esize
        self._filetype = filetype if filetype is not None else etype
        self._pos = 0

    def Get_view(self) -> tuple[int, MPI.Datatype, MPI.Datatype, str]:
        """Return ``(disp, etype, filetype, datarep)``."""
        return self._disp, self._etype, self._filetype, "native"

    def Get_type_extent(self, datatype: MPI.Datatype) -> int:
        """Return the extent of ``datatype`` in the file (native representation)."""
        return datatype.Get_extent()[1]

    # -- modes, hints ---------------------------------------------------------------
    def Get_amode(self) -> int:
        """Return the access mode the file was opened with."""
        return self._amode

    def Get_group(self) -> MPI.Group:
        """Return the group of the ranks that opened the file."""
        return self._comm.Get_group()

    def Set_atomicity(self, flag: bool) -> None:
        """Atomic mode (collective): each write is pushed to the tier before the call returns."""
        self._handle()
        self._atomic = bool(flag)
        self.Sync()

    def Get_atomicity(self) -> bool:
        """Return True in atomic mode."""
        return self._atomic

    def Get_info(self) -> MPI.Info:
        """Return the hints in use (a new ``MPI.Info`` the caller frees)."""
        tf = self._handle()
        info = MPI.Info.Create()
        for key, value in self._hints.items():
            info.Set(key, value)
        info.Set("mpiburst_wr_buffer", str(tf.limit))
        info.Set("mpiburst_channel", str(tf.channel))
        info.Set("mpiburst_bfs_path", tf.path)
        return info

    def Set_info(self, info: MPI.Info) -> None:
        """Take new hints (``mpiburst_wr_buffer`` applies to later writes)."""
        tf = self._handle()
        self._hints.update(_hints(info))
        if "mpiburst_wr_buffer" in self._hints:
            tf.limit = buffer_size(self._hints["mpiburst_wr_buffer"])

    # -- helpers --------------------------------------------------------------------
    def _handle(self) -> TierFile:
        if self._tf is None:
            raise _mpi_error(MPI.ERR_FILE)
        return self._tf

    def _byte_offset(self, offset: int) -> int:
        if offset < 0:
            raise _mpi_error(MPI.ERR_ARG)
        return self._disp + offset * self._esize

    def _collective(self, action) -> None:
        """Run ``action`` on every rank; if it fails anywhere, raise on every rank (no hang)."""
        failure: BaseException | None = None
        try:
            action()
        except MpiburstError as exc:
            failure = exc
        failed = self._comm.allreduce(failure is not None, op=MPI.LOR)
        if failure is not None:
            raise failure
        if failed:
            raise MpiburstError("another rank failed in a collective mpiburst.File call; see its message.")


def _hints(info: MPI.Info) -> dict[str, str]:
    if info is None or info == MPI.INFO_NULL:
        return {}
    return {info.Get_nthkey(i): info.Get(info.Get_nthkey(i)) for i in range(info.Get_nkeys())}


def _check_amode(amode: int) -> int | None:
    """Return the MPI error class of an invalid access mode, or None."""
    access = amode & _ACCESS
    if access not in (MPI.MODE_RDONLY, MPI.MODE_WRONLY, MPI.MODE_RDWR):
        return MPI.ERR_AMODE
    if access == MPI.MODE_RDONLY and amode & (MPI.MODE_CREATE | MPI.MODE_EXCL):
        return MPI.ERR_AMODE
    if amode & MPI.MODE_SEQUENTIAL:
        return MPI.ERR_UNSUPPORTED_OPERATION
    return None


def _open_on_rank0(tier: Tier, path: str, amode: int) -> int | None:
    """Check existence and register the file in the tier; return an MPI error class or None."""
    outcome = register(tier, path, bool(amode & MPI.MODE_CREATE), bool(amode & MPI.MODE_EXCL))
    return {"exists": MPI.ERR_FILE_EXISTS, "missing": MPI.ERR_NO_SUCH_FILE}.get(outcome)


def _delete(tier: Tier, path: str) -> None:
    """Remove ``path``'s tier data and its BFS file."""
    store_of(tier).drop(path)
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
