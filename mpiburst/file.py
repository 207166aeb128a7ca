"""``mpiburst.File``: the names, signatures and errors of ``mpi4py.MPI.File``, backed by the tier.

Switch an application by changing one import and its paths: ``burst://``
paths go through the tier (each rank writes to its own channel; no data moves
between ranks), any other path is handed to ``mpi4py.MPI.File`` unchanged.
File views and derived datatypes are flattened into byte runs
(:mod:`mpiburst.views`, :mod:`mpiburst.messages`); the shared file pointer is
a counter in the tier. Consistency follows MPI's nonatomic mode (and its
atomic mode on request) and IME's close-to-open rule; see
``docs/consistency.md``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.typing import BufSpec

from . import drain, staging
from .collective import on_root, together
from .lookup import looked
from .messages import Message, message
from .paths import is_burst, locate
from .perms import current_umask
from .store import NewFile
from .tier import Tier
from .views import View
from .writeback import TierFile, buffer_size, check_offset, register

_ACCESS = MPI.MODE_RDONLY | MPI.MODE_WRONLY | MPI.MODE_RDWR
#: Access modes that make a handle one of the file's writers (:meth:`mpiburst.store.Store.writers`).
_WRITING = MPI.MODE_WRONLY | MPI.MODE_RDWR
#: Largest file span one read through a noncontiguous view fetches at once.
_READ_WINDOW = 8 << 20

#: The requests mpiburst's nonblocking calls return are ``mpi4py.MPI.Request`` objects
#: (generalized requests, complete when returned): ``Wait``, ``Test`` and
#: ``MPI.Request.Waitall`` work on them as on any request.
Request = MPI.Request


def _mpi_error(error_class: int) -> MPI.Exception:
    """Return the MPI exception mpi4py would raise for ``error_class``."""
    return MPI.Exception(error_class)


def _done(nbytes: int) -> MPI.Request:
    """Return a completed request whose status reports ``nbytes`` bytes."""

    def query(status: MPI.Status) -> None:
        status.Set_elements(MPI.BYTE, nbytes)
        status.Set_cancelled(False)

    req = MPI.Grequest.Start(query)
    req.Complete()
    return req


def _set_status(status: MPI.Status | None, nbytes: int) -> None:
    if status is not None:
        status.Set_elements(MPI.BYTE, nbytes)


class _SharedPointer:
    """The shared file pointer of one open file, a counter in the tier (etype units).

    A counter the tier does not hold reads 0, so an open at 0 sets none; this
    process remembers whether it made one (:attr:`touched`), so closing a
    file opened by one rank that never used its shared pointer costs no
    round trip for it.
    """

    def __init__(self, tier: Tier, path: str, token: str):
        self._store = tier.store
        self._path, self._token = path, token
        self.touched = False

    def advance(self, delta: int) -> int:
        """Add ``delta`` atomically; return the value before."""
        self.touched = True
        return self._store.shared_pointer(self._path, self._token, delta)

    def get(self) -> int:
        self.touched = True
        return self._store.shared_pointer(self._path, self._token, 0)

    def set(self, value: int) -> None:
        self.touched = True
        self._store.set_shared_pointer(self._path, self._token, value)

    def drop(self) -> None:
        self._store.drop_shared_pointer(self._path, self._token)


class File:
    """A file of the burst tier with the interface of ``mpi4py.MPI.File``.

    Create it with :meth:`Open` (collective). Offsets are in etype units of
    the view (bytes by default). Unlike ``MPI.File``, a ``File`` is also a
    context manager that closes it (an addition; ``MPI.File`` is not one).
    """

    def __init__(self, comm: MPI.Intracomm, tier: Tier, path: str, amode: int, hints: dict[str, str],
                 token: str, start: int, drained: bool = False, new: NewFile | None = None):
        self._comm = comm
        self._tier = tier
        self._amode = amode
        self._hints = hints
        rank = comm.Get_rank()
        self._tf: TierFile | None = TierFile(tier, path, rank % max(tier.channels, 1),
                                             buffer_size(hints.get("mpiburst_wr_buffer")), new)
        self._view = View()
        self._atomic = False
        self._pos = start
        self._shared = _SharedPointer(tier, path, token)
        self._split: int | None = None
        self._errhandler = MPI.ERRORS_RETURN
        # Full chunks of a new file go to the BFS while it is written (mpiburst.drain).
        self._drain = drain.start(tier.store, path, token if drained else None, tier.align, rank,
                                  comm.Get_size())

    # -- open / close / delete ------------------------------------------------
    @classmethod
    def Open(cls, comm: MPI.Intracomm, filename: str | os.PathLike, amode: int = MPI.MODE_RDONLY,
             info: MPI.Info = MPI.INFO_NULL) -> File | MPI.File:
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
        tier = Tier.current(comm)   # a rank that cannot connect fails every rank, not only itself
        # a create that need not know what the BFS holds leaves the file unlooked (mpiburst.lookup)
        look = not amode & MPI.MODE_CREATE or bool(amode & (MPI.MODE_EXCL | MPI.MODE_APPEND))
        path, found = locate(filename, tier.bfs_root, look)
        outcome: Any = _check_amode(amode)
        new = None
        if outcome is None and not look and comm.Get_size() == 1 and not drain.wanted(path):
            # one process creating a file: its record goes out with its first batch (docs/api.md, "New files")
            new = NewFile(current_umask())
            outcome = uuid.uuid4().hex, 0, False
        elif outcome is None:  # rank 0 registers the file; its failure (a dead server) raises on every rank
            outcome = on_root(comm, lambda: _open_on_rank0(tier, path, amode, found, look))
        if isinstance(outcome, int):
            raise _mpi_error(outcome)
        token, start, drained = outcome
        dup = comm.Dup()
        opened: list[File] = []

        def attach() -> File:   # each rank's own part: its node's server may be the one that is gone
            opened.append(cls(dup, tier, path, amode, hints, token, start, drained, new))
            return opened[-1]

        try:
            return together(comm, attach)
        except BaseException:
            for f in opened:
                f._release()
            dup.Free()
            raise

    def Close(self) -> None:
        """Push this rank's buffered writes and close the file (collective)."""
        tf = self._handle()
        # alone, this rank's last batch counts the handle out of the file's writers (no round trip of its own);
        # with several ranks rank 0 does, once every rank's writes are in (below); rank 0 confirms its writes
        # with the changes it makes there
        alone = self._comm.Get_size() == 1 and self._drain is None and bool(self._amode & _WRITING)
        try:
            self._together(lambda: tf.close(writer=alone, confirm=self._comm.Get_rank() != 0))
        except BaseException:
            if self._drain is not None:
                self._drain.abandon()
            raise
        if self._drain is not None:
            self._drain.stop()
        self._comm.Barrier()   # no rank drains any more: the records may go out
        if self._drain is not None:
            self._drain.publish()   # never raises: every rank reaches the barrier
            self._drain = None
        self._comm.Barrier()        # a flush right after Close finds every rank's drained chunks

        def forget() -> None:
            if self._shared.touched or self._comm.Get_size() > 1:   # another rank may have made the counter
                self._shared.drop()
            if self._amode & _WRITING and not tf.counted_out:   # every rank's writes are in: it writes no more
                self._tier.store.writers(tf.path, -1)
            if self._amode & MPI.MODE_DELETE_ON_CLOSE:
                _delete(self._tier, tf.path)
            self._tier.store.confirm()   # with replicas: its writes and these changes on two nodes before Close returns

        try:
            self._rank0(forget)   # a lost server on rank 0 raises on every rank
        finally:
            self._tf = None
            self._view.release()
            self._comm.Free()

    @classmethod
    def Delete(cls, filename: str | os.PathLike, info: MPI.Info = MPI.INFO_NULL) -> None:
        """Delete ``filename``: its tier data and its BFS file (``MPI.File.Delete`` for other paths).

        Raises
        ------
        mpi4py.MPI.Exception
            ``ERR_NO_SUCH_FILE`` if neither the tier nor the BFS has the
            file; ``ERR_FILE_IN_USE`` while a flush of it runs (deleting it
            then would let the flush put it back).
        """
        if not is_burst(filename):
            return MPI.File.Delete(filename, info)
        tier = Tier.current()
        path, found = locate(filename, tier.bfs_root)
        tier.send_unsent(path)
        if tier.store.meta(path) is None and found is None:
            raise _mpi_error(MPI.ERR_NO_SUCH_FILE)
        if tier.store.leased(path):
            raise _mpi_error(MPI.ERR_FILE_IN_USE)
        _delete(tier, path)

    def __enter__(self) -> File:
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
        self._release()

    def _release(self) -> None:
        """Push this rank's buffered writes and give its connection back, without a collective."""
        if self._tf is None:
            return
        tf, self._tf = self._tf, None
        self._view.release()
        if self._drain is not None:
            self._drain.abandon()
            self._drain = None
        tf.close()

    # -- explicit offsets -----------------------------------------------------------
    def Write_at(self, offset: int, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Write ``buf`` at ``offset`` (etype units of the view)."""
        _set_status(status, self._write(self._stream(offset), self._out(buf)))

    def Write_at_all(self, offset: int, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Collective :meth:`Write_at` (no data moves between ranks; errors reach every rank)."""
        _set_status(status, self._together(lambda: self._write(self._stream(offset), self._out(buf))))

    def Iwrite_at(self, offset: int, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Write_at`; the returned request is already complete."""
        return _done(self._write(self._stream(offset), self._out(buf)))

    def Iwrite_at_all(self, offset: int, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Write_at_all`."""
        return _done(self._together(lambda: self._write(self._stream(offset), self._out(buf))))

    def Write_at_all_begin(self, offset: int, buf: BufSpec) -> None:
        """Begin a split collective write (completed by :meth:`Write_at_all_end`)."""
        self._begin(lambda: self._write(self._stream(offset), self._out(buf)))

    def Write_at_all_end(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """End the split collective write begun with :meth:`Write_at_all_begin`."""
        self._end(status)

    def Read_at(self, offset: int, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Read into ``buf`` from ``offset``; the tier's bytes first, then the BFS's."""
        _set_status(status, self._read(self._stream(offset), self._in(buf)))

    def Read_at_all(self, offset: int, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Collective :meth:`Read_at`."""
        _set_status(status, self._together(lambda: self._read(self._stream(offset), self._in(buf))))

    def Iread_at(self, offset: int, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Read_at`; the returned request is already complete."""
        return _done(self._read(self._stream(offset), self._in(buf)))

    def Iread_at_all(self, offset: int, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Read_at_all`."""
        return _done(self._together(lambda: self._read(self._stream(offset), self._in(buf))))

    def Read_at_all_begin(self, offset: int, buf: BufSpec) -> None:
        """Begin a split collective read (completed by :meth:`Read_at_all_end`)."""
        self._begin(lambda: self._read(self._stream(offset), self._in(buf)))

    def Read_at_all_end(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """End the split collective read begun with :meth:`Read_at_all_begin`."""
        self._end(status)

    # -- individual file pointer ----------------------------------------------------
    def Write(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Write ``buf`` at the individual file pointer and advance it."""
        _set_status(status, self._individual(self._write, buf, writing=True))

    def Write_all(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Collective :meth:`Write`."""
        _set_status(status, self._together(lambda: self._individual(self._write, buf, writing=True)))

    def Iwrite(self, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Write`."""
        return _done(self._individual(self._write, buf, writing=True))

    def Iwrite_all(self, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Write_all`."""
        return _done(self._together(lambda: self._individual(self._write, buf, writing=True)))

    def Write_all_begin(self, buf: BufSpec) -> None:
        """Begin a split collective :meth:`Write_all`."""
        self._begin(lambda: self._individual(self._write, buf, writing=True))

    def Write_all_end(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """End the split collective write begun with :meth:`Write_all_begin`."""
        self._end(status)

    def Read(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Read at the individual file pointer and advance it by the etypes read."""
        _set_status(status, self._individual(self._read, buf, writing=False))

    def Read_all(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Collective :meth:`Read`."""
        _set_status(status, self._together(lambda: self._individual(self._read, buf, writing=False)))

    def Iread(self, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Read`."""
        return _done(self._individual(self._read, buf, writing=False))

    def Iread_all(self, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Read_all`."""
        return _done(self._together(lambda: self._individual(self._read, buf, writing=False)))

    def Read_all_begin(self, buf: BufSpec) -> None:
        """Begin a split collective :meth:`Read_all`."""
        self._begin(lambda: self._individual(self._read, buf, writing=False))

    def Read_all_end(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """End the split collective read begun with :meth:`Read_all_begin`."""
        self._end(status)

    # -- shared file pointer ----------------------------------------------------------
    def Write_shared(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Write at the shared file pointer and advance it (one atomic step in the tier)."""
        _set_status(status, self._at_shared(self._write, self._out(buf)))

    def Iwrite_shared(self, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Write_shared`."""
        return _done(self._at_shared(self._write, self._out(buf)))

    def Read_shared(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Read at the shared file pointer and advance it by the etypes requested."""
        _set_status(status, self._at_shared(self._read, self._in(buf)))

    def Iread_shared(self, buf: BufSpec) -> MPI.Request:
        """Nonblocking :meth:`Read_shared`."""
        return _done(self._at_shared(self._read, self._in(buf)))

    def Write_ordered(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Collective write at the shared pointer, the ranks' data one after the other in rank order."""
        _set_status(status, self._together(lambda: self._ordered(self._write, self._out(buf))))

    def Write_ordered_begin(self, buf: BufSpec) -> None:
        """Begin a split collective :meth:`Write_ordered`."""
        self._begin(lambda: self._ordered(self._write, self._out(buf)))

    def Write_ordered_end(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """End the split collective write begun with :meth:`Write_ordered_begin`."""
        self._end(status)

    def Read_ordered(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """Collective read at the shared pointer, in rank order."""
        _set_status(status, self._together(lambda: self._ordered(self._read, self._in(buf))))

    def Read_ordered_begin(self, buf: BufSpec) -> None:
        """Begin a split collective :meth:`Read_ordered`."""
        self._begin(lambda: self._ordered(self._read, self._in(buf)))

    def Read_ordered_end(self, buf: BufSpec, status: MPI.Status | None = None) -> None:
        """End the split collective read begun with :meth:`Read_ordered_begin`."""
        self._end(status)

    def Seek_shared(self, offset: int, whence: int = MPI.SEEK_SET) -> None:
        """Move the shared file pointer (collective; every rank passes the same arguments)."""
        self._handle()
        view = self._view

        def act() -> None:
            if whence == MPI.SEEK_SET:
                pos = offset
            elif whence == MPI.SEEK_CUR:
                pos = self._shared.get() + offset
            elif whence == MPI.SEEK_END:
                pos = view.eof_position(self._handle().size()) + offset
            else:
                raise _mpi_error(MPI.ERR_ARG)
            if pos < 0:
                raise _mpi_error(MPI.ERR_ARG)
            self._shared.set(pos)

        self._rank0(act)

    def Get_position_shared(self) -> int:
        """Return the shared file pointer, in etype units."""
        self._handle()
        return self._shared.get()

    # -- the individual pointer, size, view --------------------------------------------
    def Seek(self, offset: int, whence: int = MPI.SEEK_SET) -> None:
        """Move the individual file pointer (etype units; ``MPI.SEEK_SET/CUR/END``)."""
        if whence == MPI.SEEK_SET:
            pos = offset
        elif whence == MPI.SEEK_CUR:
            pos = self._pos + offset
        elif whence == MPI.SEEK_END:
            pos = self._view.eof_position(self.Get_size()) + offset
        else:
            raise _mpi_error(MPI.ERR_ARG)
        if pos < 0:
            raise _mpi_error(MPI.ERR_ARG)
        self._pos = pos

    def Get_position(self) -> int:
        """Return the individual file pointer, in etype units."""
        return self._pos

    def Get_byte_offset(self, offset: int) -> int:
        """Return the absolute byte offset of view offset ``offset`` (etypes)."""
        self._handle()
        return self._view.byte_offset(self._stream(offset))

    def Get_size(self) -> int:
        """Return the file's size in bytes (tier and BFS, after truncations)."""
        return self._handle().size()

    def Set_size(self, size: int) -> None:
        """Truncate or extend the file to ``size`` bytes (collective)."""
        if size < 0:
            raise _mpi_error(MPI.ERR_ARG)
        check_offset(size, f"set the size {size} of")  # same argument on every rank: all refuse together
        tf = self._handle()
        self._together(tf.push)
        self._rank0(lambda: tf.set_size(size))

    def Preallocate(self, size: int) -> None:
        """Make the file at least ``size`` bytes long (collective)."""
        if size < 0:
            raise _mpi_error(MPI.ERR_ARG)
        check_offset(size, f"preallocate {size} bytes of")
        tf = self._handle()
        self._together(tf.push)

        def grow() -> None:
            if tf.size() < size:
                tf.set_size(size)

        self._rank0(grow)

    def Sync(self) -> None:
        """Push this rank's buffered writes to the tier (collective).

        After the writer's ``Sync``, a barrier and the reader's ``Sync``, the
        reader sees the data (MPI's sync-barrier-sync). On a run with
        ``replicas=1`` it returns once the data is on its node and that node's
        replica. Durability on the BFS is :func:`mpiburst.sync`.

        Every rank's writes being in the tier, the file's state is one the
        application made consistent: when this handle is the file's only
        writer, it becomes the file's settled mark, the state the engine's
        automatic sync may publish while the file stays open
        (docs/consistency.md, "Published states").
        """
        self._together(lambda: self._handle().sync())
        if self._amode & _WRITING:
            path = self._handle().path
            self._rank0(lambda: self._tier.store.writers(path, 0, 1))

    def Set_view(self, disp: int = 0, etype: MPI.Datatype = MPI.BYTE, filetype: MPI.Datatype | None = None,
                 datarep: str = "native", info: MPI.Info = MPI.INFO_NULL) -> None:
        """Set the view (collective): ``disp`` bytes, then ``filetype`` tiled; offsets in ``etype`` units.

        Any etype and filetype ``MPI.File`` takes: derived, with holes, a
        lower bound, resized. Both file pointers go back to 0.

        Raises
        ------
        mpi4py.MPI.Exception
            ``ERR_ARG`` (negative ``disp``, filetype not made of etypes),
            ``ERR_IO`` (filetype runs that overlap or go backwards),
            ``ERR_UNSUPPORTED_DATAREP`` (anything but ``"native"``).
        """
        self._handle()

        def check() -> View:
            if datarep != "native":
                raise _mpi_error(MPI.ERR_UNSUPPORTED_DATAREP)
            return View(disp, etype, filetype)

        view = self._together(check)
        self._together(self._push_all)
        self._rank0(lambda: self._shared.set(0))
        old, self._view, self._pos = self._view, view, 0
        old.release()

    def Get_view(self) -> tuple[int, MPI.Datatype, MPI.Datatype, str]:
        """Return ``(disp, etype, filetype, datarep)``; derived datatypes are new copies the caller frees."""
        etype, filetype = self._view.datatypes()
        return self._view.disp, etype, filetype, "native"

    def Get_type_extent(self, datatype: MPI.Datatype) -> int:
        """Return the extent of ``datatype`` in the file (native representation)."""
        return datatype.Get_extent()[1]

    # -- modes, hints, error handlers ---------------------------------------------------
    def Get_amode(self) -> int:
        """Return the access mode the file was opened with."""
        return self._amode

    def Get_group(self) -> MPI.Group:
        """Return the group of the ranks that opened the file."""
        return self._comm.Get_group()

    def Set_atomicity(self, flag: bool) -> None:
        """Set atomic mode (collective): sequential consistency among the file's ranks.

        In atomic mode each access talks to the tier before it returns: a
        write is pushed (one batch when it fits the write-back buffer), a
        read fetches the tier's current bytes. See ``docs/consistency.md``.
        """
        self._handle()
        self._together(self._push_all)
        self._atomic = bool(flag)

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

    def Get_errhandler(self) -> MPI.Errhandler:
        """Return the error handler set (errors are raised as exceptions whatever it is)."""
        return self._errhandler

    def Set_errhandler(self, errhandler: MPI.Errhandler) -> None:
        """Record ``errhandler``; mpiburst raises ``MPI.Exception`` as mpi4py does with ``ERRORS_RETURN``."""
        self._errhandler = errhandler

    def Call_errhandler(self, errorcode: int) -> None:
        """Raise ``MPI.Exception(errorcode)``, as the default file error handler does under mpi4py."""
        raise _mpi_error(errorcode)

    @property
    def amode(self) -> int:
        """The access mode (``Get_amode``)."""
        return self.Get_amode()

    @property
    def atomicity(self) -> bool:
        """Atomic mode (``Get_atomicity`` / ``Set_atomicity``)."""
        return self.Get_atomicity()

    @atomicity.setter
    def atomicity(self, flag: bool) -> None:
        self.Set_atomicity(flag)

    @property
    def group(self) -> MPI.Group:
        """The group of the file (``Get_group``)."""
        return self.Get_group()

    @property
    def group_size(self) -> int:
        """Number of ranks that opened the file."""
        return self._comm.Get_size()

    @property
    def group_rank(self) -> int:
        """This rank in the file's group."""
        return self._comm.Get_rank()

    @property
    def info(self) -> MPI.Info:
        """The hints in use (``Get_info``)."""
        return self.Get_info()

    @info.setter
    def info(self, info: MPI.Info) -> None:
        self.Set_info(info)

    @property
    def size(self) -> int:
        """The file size in bytes (``Get_size``)."""
        return self.Get_size()

    # -- data paths -------------------------------------------------------------------
    def _out(self, buf: BufSpec) -> Message:
        self._handle()
        if not self._amode & (MPI.MODE_WRONLY | MPI.MODE_RDWR):
            raise _mpi_error(MPI.ERR_READ_ONLY)
        return self._whole_etypes(message(buf, writable=False))

    def _in(self, buf: BufSpec) -> Message:
        self._handle()
        if not self._amode & (MPI.MODE_RDONLY | MPI.MODE_RDWR):
            raise _mpi_error(MPI.ERR_ACCESS)
        return self._whole_etypes(message(buf, writable=True))

    def _whole_etypes(self, msg: Message) -> Message:
        esize = self._view.esize
        if esize != 1 and msg.nbytes % esize:
            raise _mpi_error(MPI.ERR_IO)  # MPICH: "Only an integral number of etypes can be accessed"
        return msg

    def _write(self, pos: int, msg: Message) -> int:
        """Write ``msg`` at stream byte ``pos`` of the view; return the bytes written."""
        tf = self._handle()
        n = msg.nbytes
        if n == 0:
            return 0
        view = self._view
        dev = msg.device
        run = msg.run() if dev is not None else None
        if dev is not None and run is not None and view.contiguous:  # device to tier, the copies overlapping
            if self._atomic:
                tf.push()
            staging.download(dev, run[0], n, lambda at, chunk: tf.write(view.disp + pos + at, chunk))
            if self._atomic:
                tf.push()
            return n
        data = msg.gather()
        if self._atomic:
            tf.push()
        if view.contiguous:
            tf.write(view.disp + pos, data)
        else:
            for at, offs, lens in view.chunks(pos, n):   # one call per slice of runs, not per run
                tf.write_runs(offs, lens, data[at:at + int(lens.sum())])
        if self._atomic:
            tf.push()
        return n

    def _read(self, pos: int, msg: Message) -> int:
        """Read stream bytes ``[pos, pos + msg.nbytes)`` of the view into ``msg``; return the bytes found."""
        tf = self._handle()
        n = msg.nbytes
        if n == 0:
            return 0
        view = self._view
        dev = msg.device
        run = msg.run() if dev is not None else None
        if dev is not None and run is not None and view.contiguous:  # tier to device, the copies overlapping
            return staging.upload(dev, run[0], n, lambda at, chunk: tf.read(view.disp + pos + at, chunk))
        direct = msg.contiguous()
        stream = direct if direct is not None else memoryview(bytearray(n))
        if view.contiguous:
            got = tf.read(view.disp + pos, stream)
        else:
            got = sum(_read_runs(tf, offs, lens, stream[at:]) for at, offs, lens in view.chunks(pos, n))
        if direct is None:
            msg.scatter(stream[:got])
        return got

    def _stream(self, offset: int) -> int:
        """Return the stream byte of view offset ``offset`` (etypes)."""
        if offset < 0:
            raise _mpi_error(MPI.ERR_ARG)
        return offset * self._view.esize

    def _individual(self, access: Callable[[int, Message], int], buf: BufSpec, writing: bool) -> int:
        msg = self._out(buf) if writing else self._in(buf)
        nbytes = access(self._pos * self._view.esize, msg)
        self._pos += nbytes // self._view.esize
        return nbytes

    def _at_shared(self, access: Callable[[int, Message], int], msg: Message) -> int:
        count = msg.nbytes // self._view.esize
        start = self._shared.advance(count)
        return access(start * self._view.esize, msg)

    def _ordered(self, access: Callable[[int, Message], int], msg: Message) -> int:
        """Rank-ordered access: an exclusive scan of the counts, one atomic advance by rank 0."""
        count = msg.nbytes // self._view.esize
        counts = self._comm.allgather(count)
        rank = self._comm.Get_rank()
        start = self._rank0(lambda: self._shared.advance(sum(counts)))
        return access((start + sum(counts[:rank])) * self._view.esize, msg)

    def _begin(self, action: Callable[[], int]) -> None:
        """Start a split collective: run it now (collectively), keep its byte count for the end."""
        self._handle()
        if self._split is not None:
            raise _mpi_error(MPI.ERR_IO)  # MPICH: "split collective I/O operation already active"
        self._split = self._together(action)

    def _end(self, status: MPI.Status | None) -> None:
        self._handle()
        if self._split is None:
            raise _mpi_error(MPI.ERR_IO)  # MPICH: "No split collective I/O operation is active"
        nbytes, self._split = self._split, None
        _set_status(status, nbytes)

    # -- helpers --------------------------------------------------------------------
    def _handle(self) -> TierFile:
        if self._tf is None:
            raise _mpi_error(MPI.ERR_FILE)
        return self._tf

    def _push_all(self) -> None:
        self._handle().push()

    def _together(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on every rank; if it fails on any, raise on every rank (no hang)."""
        return together(self._comm, action)

    def _rank0(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 only; every rank returns its result or raises its exception."""
        return on_root(self._comm, action)


def _read_runs(tf: TierFile, offs: np.ndarray, lens: np.ndarray, stream: memoryview) -> int:
    """Fill ``stream`` from the file runs ``(offs, lens)``, one read per window of at most 8 MiB.

    Returns the bytes that exist (runs, or their parts, past the end of the
    file count nothing; holes inside the file read as zeros).
    """
    offs_l, lens_l = offs.tolist(), lens.tolist()
    ends = np.cumsum(lens).tolist()
    got = 0
    i, n = 0, len(offs_l)
    while i < n:
        j = i + 1
        while j < n and offs_l[j] + lens_l[j] - offs_l[i] <= _READ_WINDOW:
            j += 1
        lo, hi = offs_l[i], offs_l[j - 1] + lens_l[j - 1]
        if j == i + 1:  # one run: straight into the stream
            at = ends[i] - lens_l[i]
            got += tf.read(lo, stream[at:at + lens_l[i]])
            i = j
            continue
        window = memoryview(bytearray(hi - lo))
        top = lo + tf.read(lo, window)
        for k in range(i, j):
            o, ln = offs_l[k], lens_l[k]
            at = ends[k] - ln
            stream[at:at + ln] = window[o - lo:o - lo + ln]
            got += max(0, min(ln, top - o))
        i = j
    return got


def _hints(info: MPI.Info) -> dict[str, str]:
    if info is None or info == MPI.INFO_NULL:
        return {}
    keys = [info.Get_nthkey(i) for i in range(info.Get_nkeys())]
    return {key: value for key in keys if (value := info.Get(key)) is not None}


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


def _open_on_rank0(tier: Tier, path: str, amode: int, found: os.stat_result | None,
                   look: bool = True) -> int | tuple[str, int, bool]:
    """Check existence, register the file in the tier and start its shared file pointer.

    ``found`` is what the BFS holds at ``path`` (:func:`mpiburst.paths.locate`);
    ``look`` False: it was not looked at, and a new record is made unlooked
    (:mod:`mpiburst.lookup`).

    Returns an MPI error class, or the shared pointer's token (which also
    names a drain's data file), the file pointers' start (0, or the file
    size with ``MODE_APPEND``) and whether the file is drained while written.
    """
    drained = bool(amode & _WRITING) and drain.wanted(path)
    # with a writing mode, one writer for all the ranks until Close (docs/consistency.md, "Published states"),
    # counted in the create's own round trip
    outcome = register(tier, path, bool(amode & MPI.MODE_CREATE), bool(amode & MPI.MODE_EXCL), found,
                       writing=bool(amode & _WRITING), look=look)
    if isinstance(outcome, str):
        return {"exists": MPI.ERR_FILE_EXISTS, "missing": MPI.ERR_NO_SUCH_FILE}[outcome]
    # another open may have made the record unlooked: the start needs its BFS size
    start = looked(tier.store, outcome).size if amode & MPI.MODE_APPEND else 0
    token = uuid.uuid4().hex
    if start:   # a pointer the tier does not hold reads 0: one round trip less for a new file
        _SharedPointer(tier, path, token).set(start)
    return token, start, drained


def _delete(tier: Tier, path: str) -> None:
    """Remove ``path``'s tier data and its BFS file."""
    tier.store.drop(path)
    drain.remove_leftovers(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
