"""``mpiburst.open()``: a binary, seekable Python file object over one tier file.

Any code that takes a file object (h5py, numpy, zipfile, pickle, tarfile)
can read and write a file of the tier through it. It is the serial
counterpart of :class:`mpiburst.File`, built on the same
:class:`~mpiburst.writeback.TierFile`: writes go to a write-back buffer that is
pushed to the tier as large batches (on :meth:`BurstIO.flush`, on
:meth:`BurstIO.close`, when it fills, and before every read of the tier);
reads take the tier's bytes where it has them, else the BFS file's.

Consistency is close-to-open, as for the driver: a file object sees the
writes that other processes pushed before it was opened, and its own writes
at once. Reads go through a small page cache (:data:`PAGE` bytes per page,
:data:`PAGES` pages, least recently used dropped first) because h5py reads
metadata a few bytes at a time; the object's own writes and truncations
invalidate the pages they touch, other processes' later writes are not
seen until the file is opened again.

``write`` and ``readinto`` take what ``mpiburst.File`` takes beyond the
buffer protocol (``__cuda_array_interface__``, DLPack; see
:mod:`mpiburst.memory`): objects with the buffer protocol are handled as any
file object handles them, device memory is staged through pinned buffers
(:mod:`mpiburst.staging`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NoReturn

from . import staging
from .errors import MpiburstError
from .memory import DeviceMemory, decode
from .paths import locate
from .writeback import TierFile, buffer_size, register, with_room

if TYPE_CHECKING:
    from .tier import Tier

#: Bytes per read-cache page (a read-ahead unit: one tier round trip serves it).
PAGE = 256 << 10
#: Pages kept in a file object's read cache.
PAGES = 16

_MODES = {  # mode letter -> (readable, writable, create, exclusive, truncate, append)
    "r": (True, False, False, False, False, False),
    "w": (False, True, True, False, True, False),
    "a": (False, True, True, False, False, True),
    "x": (False, True, True, True, False, False),
}


def open(path: str | os.PathLike, mode: str = "rb", *, tier: Tier | None = None,
         buffer: str | int | None = None) -> BurstIO:  # noqa: A001 - the name mirrors open()
    """Open a file of the tier as a binary Python file object.

    Parameters
    ----------
    path
        ``burst://dir/file`` (relative to the run's BFS root),
        ``burst:///abs/file``, or a plain path inside the BFS root.
    mode
        ``"rb"``, ``"r+b"``, ``"wb"``, ``"w+b"``, ``"ab"``, ``"a+b"``,
        ``"xb"`` or ``"x+b"``, with the meaning they have for :func:`open`.
    tier
        The run's :class:`~mpiburst.tier.Tier`; default :meth:`Tier.current`.
    buffer
        Write-back buffer size (``"8M"`` or bytes); default
        ``$MPIBURST_WR_BUFFER``, else 4 MiB.

    Returns
    -------
    BurstIO
        The open file object (also a context manager).

    Raises
    ------
    FileNotFoundError
        For ``"r"`` modes when neither the tier nor the BFS has the file.
    FileExistsError
        For ``"x"`` modes when the file exists.
    ValueError
        For a mode that is not one of the above (text modes included).
    mpiburst.errors.PathError
        If the path resolves outside the run's BFS root.
    """
    from .tier import Tier

    flags = _parse_mode(mode)
    tier = tier if tier is not None else Tier.current()
    target, found = locate(path, tier.bfs_root)
    _register(tier, target, flags, path, found)
    return BurstIO(TierFile(tier, target, 0, buffer_size(buffer)), os.fspath(path), mode, flags)


def _parse_mode(mode: str) -> tuple[bool, bool, bool, bool, bool, bool]:
    """Return ``(readable, writable, create, exclusive, truncate, append)`` for a binary ``mode``."""
    letters = [c for c in mode if c in _MODES]
    rest = set(mode) - set(_MODES) - {"b", "+"}
    if len(letters) != 1 or "b" not in mode or rest or len(set(mode)) != len(mode):
        raise ValueError(f"mpiburst.open: invalid mode {mode!r}; use a binary mode such as 'rb', 'r+b', 'wb', "
                         "'w+b', 'ab' or 'xb' (wrap the object in io.TextIOWrapper for text).")
    readable, writable, create, exclusive, truncate, append = _MODES[letters[0]]
    if "+" in mode:
        readable = writable = True
    return readable, writable, create, exclusive, truncate, append


def _register(tier: Any, target: str, flags: tuple, name: str | os.PathLike, found: os.stat_result | None) -> None:
    """Register ``target`` in the tier as :class:`mpiburst.File` does, with OSErrors as ``open()`` raises them.

    ``found`` is what the BFS holds at ``target`` (:func:`mpiburst.paths.locate`).
    """
    readable, writable, create, exclusive, truncate, _ = flags
    # a writer is counted before the truncation: the state it settles is the one before this open
    outcome = register(tier, target, create, exclusive, found, writing=writable)
    if outcome == "missing":
        raise FileNotFoundError(errno.ENOENT, "No such file in the tier or on the BFS", os.fspath(name))
    if outcome == "exists":
        raise FileExistsError(errno.EEXIST, "File exists in the tier or on the BFS", os.fspath(name))
    if truncate:
        with_room(tier, lambda: tier.store.set_size(target, 0), f"truncate {target}")


class BurstIO(io.BufferedIOBase):
    """A binary, seekable file object over one tier file (made by :func:`open`).

    Reads return as many bytes as asked for unless the end of the file comes
    first; writes take every byte and return their count. ``flush`` pushes
    the write-back buffer to the tier (visible to processes that open the
    file afterwards); ``close`` flushes too. Durability on the BFS is
    :func:`mpiburst.sync`.
    """

    def __init__(self, tf: TierFile, name: str, mode: str, flags: tuple) -> None:
        super().__init__()
        self._tf = tf
        self.name = name
        self.mode = mode
        self._readable, self._writable, *_, self._append = flags
        self._pos = 0
        self._size = tf.size()
        self._pages: OrderedDict[int, bytes] = OrderedDict()

    # -- capabilities ---------------------------------------------------------
    def readable(self) -> bool:
        """True if the object was opened for reading."""
        self._check_open()
        return self._readable

    def writable(self) -> bool:
        """True if the object was opened for writing."""
        self._check_open()
        return self._writable

    def seekable(self) -> bool:
        """True: every position can be sought."""
        self._check_open()
        return True

    @property
    def path(self) -> str:
        """The absolute BFS path of the file."""
        return self._tf.path

    # -- position ---------------------------------------------------------------
    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position (``SEEK_SET``, ``SEEK_CUR``, ``SEEK_END``); return the new one."""
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        pos = base + offset
        if pos < 0:
            raise OSError(errno.EINVAL, f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        """Return the position."""
        self._check_open()
        return self._pos

    # -- reads --------------------------------------------------------------------
    def readinto(self, b: Any) -> int:
        """Read up to ``len(b)`` bytes into ``b`` (fewer only at the end of the file); return the count."""
        self._check_readable()
        out = _bytes_of(b, writable=True)
        n = max(0, min(len(out), self._size - self._pos))
        pos = self._pos
        if isinstance(out, DeviceMemory):
            n = staging.upload(out, 0, n, lambda at, chunk: self._read_at(pos + at, chunk))
        else:
            n = self._read_at(pos, out[:n])
        self._pos += n
        return n

    readinto1 = readinto

    def read(self, size: int | None = -1) -> bytes:
        """Read ``size`` bytes (all to the end of the file if negative or None)."""
        self._check_readable()
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    read1 = read

    def peek(self, size: int = 0) -> bytes:
        """Return bytes from the position without moving it (at least one unless at the end)."""
        self._check_readable()
        if self._pos >= self._size:
            return b""
        index = self._pos // PAGE
        page = self._page(index)
        return page[self._pos - index * PAGE:]

    def _read_at(self, pos: int, out: memoryview) -> int:
        """Fill ``out`` from file byte ``pos`` (large reads from the tier, small ones through the cache)."""
        if len(out) >= PAGE:
            return self._tf.read(pos, out)
        return self._copy_cached(pos, out) if len(out) else 0

    def _copy_cached(self, pos: int, out: memoryview) -> int:
        """Copy file bytes from ``pos`` into ``out`` through the page cache; return the count."""
        done = 0
        while done < len(out):
            index, skip = divmod(pos + done, PAGE)
            page = self._page(index)
            take = min(len(out) - done, len(page) - skip)
            if take <= 0:
                break
            out[done:done + take] = page[skip:skip + take]
            done += take
        return done

    def _page(self, index: int) -> bytes:
        """Return cache page ``index`` (reading it from the tier on a miss)."""
        page = self._pages.get(index)
        if page is not None:
            self._pages.move_to_end(index)
            return page
        buf = bytearray(min(PAGE, max(0, self._size - index * PAGE)))
        n = self._tf.read(index * PAGE, memoryview(buf))
        page = bytes(buf[:n])
        self._pages[index] = page
        if len(self._pages) > PAGES:
            self._pages.popitem(last=False)
        return page

    # -- writes ---------------------------------------------------------------------
    def write(self, b: Any) -> int:
        """Write every byte of ``b`` at the position (at the end in append mode); return the count."""
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("write: the file was not opened for writing")
        data = _bytes_of(b, writable=False)
        n = len(data)
        if not n:
            return 0
        if self._append:
            self._pos = self._size
        if isinstance(data, DeviceMemory):
            pos = self._pos
            staging.download(data, 0, n, lambda at, chunk: self._tf.write(pos + at, chunk))
        else:
            self._tf.write(self._pos, data)
        self._forget(self._pos, self._pos + n)
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        """Make the file ``size`` bytes long (default: the position); return the size."""
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("truncate: the file was not opened for writing")
        size = self._pos if size is None else size
        if size < 0:
            raise OSError(errno.EINVAL, f"negative size {size}")
        self._tf.set_size(size)
        self._size = size
        self._pages.clear()
        return size

    def _forget(self, lo: int, hi: int) -> None:
        """Drop the cache pages that bytes ``[lo, hi)`` touch, and short (end of file) pages."""
        for index in [i for i, page in self._pages.items()
                      if len(page) < PAGE or (i * PAGE < hi and lo < (i + 1) * PAGE)]:
            del self._pages[index]

    # -- flush / close ----------------------------------------------------------------
    def flush(self) -> None:
        """Push buffered writes to the tier (other processes that open the file then see them)."""
        self._check_open()
        self._tf.push()

    def close(self) -> None:
        """Flush, close and give the tier connection back; later calls do nothing."""
        if self.closed:
            return
        flushed = False
        try:
            super().close()  # calls flush(), then marks the object closed even if that fails
            flushed = True
        finally:
            self._pages.clear()
            if flushed:
                self._tf.close(writer=self._writable)   # counted out of the writers, then confirmed
            else:  # the flush's error is the one to report; still give the connection back
                with contextlib.suppress(MpiburstError):
                    self._tf.close()

    def detach(self) -> NoReturn:
        """Not supported: there is no raw stream underneath."""
        raise io.UnsupportedOperation("detach: mpiburst file objects have no raw stream")

    # -- helpers ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def _check_readable(self) -> None:
        self._check_open()
        if not self._readable:
            raise io.UnsupportedOperation("read: the file was not opened for reading")

    def __repr__(self) -> str:
        return f"<mpiburst.BurstIO name={self.name!r} mode={self.mode!r}>"


def _bytes_of(b: Any, writable: bool) -> memoryview | DeviceMemory:
    """The bytes of ``b``: as any file object takes a buffer-protocol object, else as :func:`~mpiburst.memory.decode`."""
    try:
        view = memoryview(b)
    except TypeError:
        return decode(b, writable)
    return view.cast("B")
