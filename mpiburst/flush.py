"""The flush engine: turn a file's fragments in the tier into large aligned writes on the BFS.

A flush of one file (:func:`sync`) works on a *snapshot*: the file's sequence
number ``S`` when the flush starts. Writes that arrive later stay dirty for the
next flush. The file ``[0, size)`` is cut into ``align``-sized stripes; each
flusher (one process, or each rank of a communicator, as ROMIO's aggregators
take file domains) takes a contiguous run of stripes and walks it
:data:`WRITE_SIZE` bytes at a time:

1. lists the extents of those stripes with ``seq <= S``; a stripe with nothing
   newer than the clean watermark is skipped (its BFS bytes are already right),
   the others form runs of adjacent dirty stripes;
2. receives the extents' bytes straight into the run's buffer in sequence
   order (newest wins);
3. fills the bytes no extent covers from the existing BFS file (read only those
   gaps, only below the BFS size after any pending truncation), else zeros;
4. writes each run with one ``pwrite`` at its aligned offset, while a second
   thread already assembles the next :data:`WRITE_SIZE` bytes into a second
   buffer, so the tier read and the BFS write overlap.

So the BFS sees about ``bytes / WRITE_SIZE`` write calls, each aligned and a
whole number of stripes, whatever the number of fragments, and a flusher holds
two buffers of :data:`WRITE_SIZE` bytes.

Durability: a file that already exists on the BFS is updated in place (after
applying a pending ``Set_size`` truncation); a new file is written aside as
``.<name>.mpiburst-<token>``, fsync'd and renamed, and the directory fsync'd,
so a half-written new file never appears under its final name. The file and
any directories the flush creates get the permissions a direct write by the
application would have given them (:mod:`mpiburst.perms`). Only after
every flusher's bytes are fsync'd is the snapshot marked clean
(:meth:`~mpiburst.store.FlushLease.mark_clean`, which checks the flush still
holds the file's lease). Any failure releases the lease, leaves the data dirty and
raises :class:`~mpiburst.errors.FlushError`; a later sync completes the job.

Non-blocking syncs (``block=False``) are queued in the store's request queue
for the automatic engine (:mod:`mpiburst.engine`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .assembly import BfsBytes, current_bytes
from .buffers import borrowed
from .collective import on_root
from .errors import FlushError, MpiburstError, PathError, TierConnectionError
from .paths import resolve
from .perms import create_aside, current_umask, give_final_attrs, make_dirs
from .store import FlushLease, Store
from .tier import Tier

#: Largest write call of a flush: adjacent dirty stripes are assembled into one
#: buffer of up to this many bytes (rounded down to whole stripes, at least one).
WRITE_SIZE = 8 << 20
#: Lifetime of a flush lease; every flusher renews it after each write.
LEASE_SECONDS = 30.0
#: How long a blocking sync waits for another flusher of the same file to finish.
LEASE_WAIT = 120.0
#: Seconds a flush waits for a lease before it says so (a dead flusher's lease lasts up to LEASE_SECONDS).
LEASE_NOTE_AFTER = 1.0

_log = logging.getLogger(__name__)
#: Called as ``observer(path, offset, length)`` for every write call made on the BFS
#: (after it succeeded); tests and benchmarks use it to count and check writes.
write_observers: list[Callable[[str, int, int], None]] = []


@dataclass
class FlushReport:
    """What one flush of one file did.

    Attributes
    ----------
    path : str
        The BFS path of the file.
    size : int
        Its size on the BFS after the flush.
    bytes : int
        Bytes written to the BFS by this flush (every flusher together).
    writes : int
        Write calls made on the BFS.
    write_sizes : dict
        ``{write size: count}``; every write is a whole number of stripes, at
        most :data:`WRITE_SIZE` (only the file's last stripe may be short).
    seconds : float
        Wall time of the flush.
    checksum : str or None
        SHA-256 (hex) of the whole BFS file after the flush, when verified.
    upto : int
        The snapshot: every write with a sequence number up to this is now clean.
    """

    path: str
    size: int = 0
    bytes: int = 0
    writes: int = 0
    write_sizes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    checksum: str | None = None
    upto: int = 0


@dataclass
class _Plan:
    """The snapshot and target of one flush, decided by rank 0 and shared with every flusher."""

    target: str
    work: str          # the file written: ``target`` (in place) or a temporary name beside it
    token: str
    upto: int
    clean: int
    size: int
    trunc: int | None
    align: int
    base: int          # BFS bytes that may fill gaps (0 for a new file)
    new: bool
    umask: int         # of the application: new files and directories get the modes it gives


class _Tally:
    """Write calls and bytes of one flusher (thread-safe: workers share it)."""

    def __init__(self, progress: Callable[[int], None] | None = None, verify: bool = False) -> None:
        self.bytes = 0
        self.sizes: Counter[int] = Counter()
        self.crcs: list[tuple[int, int, int]] = []   # (offset, length, crc32) of writes, to verify
        self._lock = threading.Lock()
        self._progress = progress
        self._verify = verify

    def add(self, offset: int, data: memoryview) -> None:
        crc = zlib.crc32(data) if self._verify else 0
        with self._lock:
            self.bytes += len(data)
            self.sizes[len(data)] += 1
            if self._verify:
                self.crcs.append((offset, len(data), crc))
            total = self.bytes
        if self._progress is not None:
            self._progress(total)


class _Solo:
    """The part of an mpi4py communicator a flush uses, for a single process."""

    @staticmethod
    def Get_rank() -> int:
        return 0

    @staticmethod
    def Get_size() -> int:
        return 1

    @staticmethod
    def bcast(obj: Any, root: int = 0) -> Any:
        return obj

    @staticmethod
    def allgather(obj: Any) -> list:
        return [obj]


class _LeaseLost(Exception):
    """The flush lease expired or was released by a failing flusher."""


_LEASE_LOST = "the flush lease was lost (another flusher failed, or this one stalled past the lease)"


# ----------------------------------------------------------------------------- public API

def sync(path: str | os.PathLike, *, tier: Tier | None = None, comm: Any = None, block: bool = True,
         verify: bool = False, workers: int = 1,
         progress: Callable[[int], None] | None = None) -> FlushReport | None:
    """Write the dirty data of one file from the tier to the BFS.

    Parameters
    ----------
    path
        A BFS path inside the run's root, or a ``burst://`` URL.
    tier
        The run's :class:`~mpiburst.tier.Tier`; default :meth:`Tier.current`.
    comm
        An mpi4py communicator: the call is collective, each rank writes a
        contiguous run of stripes. ``None``: this process writes them all.
    block
        False: queue the request for the automatic engine and return None.
    verify
        Read back every written stripe and compare it with what was written,
        check the final size, and return the file's SHA-256 in the report.
    workers
        Threads per process writing disjoint runs of stripes.
    progress
        Called with this process's bytes written so far, after each write.

    Returns
    -------
    FlushReport or None
        The same report on every rank; None when ``block`` is False.

    Raises
    ------
    FlushError
        On any failure (full or failing BFS, permissions, lost server
        connection, lost lease); on every rank. The data stays dirty.
    PathError
        If the path is outside the root or the tier does not hold the file.
    """
    tier = tier or Tier.current()
    target = resolve(path, tier.bfs_root)
    if not block:
        enqueue(tier, "sync", target)
        return None
    comm = comm if comm is not None else _Solo()
    store = tier.store
    started = time.monotonic()

    def prepare() -> _Plan:
        try:
            return _prepare(store, target, tier.align)
        except (PathError, FlushError):
            raise
        except Exception as exc:   # a lost server, say: the data stays dirty, say so
            raise _failed(target, _cause(exc)) from None

    plan = on_root(comm, prepare)       # rank 0 plans; every rank gets the plan or the error

    nstripes = -(-plan.size // plan.align)
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    first, last = rank * nstripes // nprocs, (rank + 1) * nstripes // nprocs
    tally = _Tally(progress, verify)
    error: str | None = None
    try:
        with FlushLease(store, plan.target, plan.token, LEASE_SECONDS):  # a failure gives the lease back,
            _write_run(store, plan, first, last, tally, max(1, workers))  # so the other flushers stop soon
            if verify:
                _verify_stripes(plan.work, tally.crcs)
    except Exception as exc:  # every cause becomes one line; the data stays dirty
        error = _cause(exc)
    outcomes = comm.allgather((error, tally.bytes, dict(tally.sizes)))

    def finish() -> FlushReport:
        # The root cause first: the other flushers only saw the lease the failing one released.
        failures = sorted((e for e, _, _ in outcomes if e), key=lambda e: e == _LEASE_LOST)
        if failures:
            _abort(store, plan)
            raise _failed(target, failures[0])
        try:
            return _finish(store, plan, verify)
        except Exception as exc:
            _abort(store, plan)
            raise _failed(target, _cause(exc)) from None

    result = on_root(comm, finish)      # rank 0 publishes and marks clean; every rank gets the outcome
    sizes: Counter[int] = Counter()
    for _, _, s in outcomes:
        sizes.update(s)
    result.bytes = sum(b for _, b, _ in outcomes)
    result.writes = sum(sizes.values())
    result.write_sizes = dict(sorted(sizes.items()))
    result.seconds = time.monotonic() - started
    return result


def enqueue(tier: Tier, op: str, path: str, **fields: Any) -> None:
    """Queue a request (``op`` = ``"sync"`` or ``"prestage"``) in the tier for the engine."""
    tier.store.enqueue(json.dumps(dict(op=op, path=path, time=time.time(), **fields)).encode())


# ----------------------------------------------------------------------------- the steps

def _prepare(store: Store, target: str, align: int) -> _Plan:
    """Take the lease, snapshot the file, and make the file to write (rank 0 only)."""
    if store.meta(target) is None:
        raise PathError(f"{target} is not in the tier; there is nothing to sync.")
    lease = _take_lease(store, target)
    token = lease.token
    try:
        snap = lease.begin()
        umask = snap.umask if snap.umask is not None else current_umask()
        directory, name = os.path.split(target)
        make_dirs(directory, umask)
        if os.path.exists(target):
            fd = os.open(target, os.O_RDWR)
            try:
                base = os.fstat(fd).st_size
                if snap.trunc is not None and snap.trunc < base:
                    os.ftruncate(fd, snap.trunc)
                    base = snap.trunc
            finally:
                os.close(fd)
            work, new = target, False
        else:
            for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.mpiburst-*")):
                _quiet(lambda: os.unlink(stale))  # left by a killed flusher whose lease expired
            work, new, base = os.path.join(directory, f".{name}.mpiburst-{token}"), True, 0
            create_aside(work)
    except Exception as exc:
        lease.release()
        raise FlushError(f"sync of {target} failed: {_cause(exc)}; the data stays dirty in the tier, "
                         f"fix the cause and run the sync again.") from None
    return _Plan(target=target, work=work, token=token, upto=snap.seq, clean=snap.clean, size=snap.size,
                 trunc=snap.trunc, align=align, base=base, new=new, umask=umask)


def _take_lease(store: Store, target: str) -> FlushLease:
    """Return the file's flush lease, waiting up to :data:`LEASE_WAIT` for another flusher."""
    started = time.monotonic()
    deadline = started + LEASE_WAIT
    noted = False
    while True:
        lease = store.flush_lease(target, LEASE_SECONDS)
        if lease is not None:
            return lease
        if not noted and time.monotonic() > started + LEASE_NOTE_AFTER:
            _log.warning("sync of %s waits for its flush lease: another flush holds it, or one that died left "
                         "it, and then it expires within %.0f s.", target, LEASE_SECONDS)
            noted = True
        if time.monotonic() > deadline:
            raise FlushError(f"another flush of {target} has held it for over {LEASE_WAIT:.0f} s; "
                             "wait for it to finish and try again.")
        time.sleep(0.05)


def _write_run(store: Store, plan: _Plan, first: int, last: int, tally: _Tally, workers: int) -> None:
    """Write stripes ``[first, last)``, split among ``workers`` threads, then fsync."""
    if first >= last:
        return
    if workers == 1 or last - first < 2:
        _write_stripes(store, plan, first, last, tally)
        return
    n = min(workers, last - first)
    bounds = [first + k * (last - first) // n for k in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(_write_stripes, store, plan, a, b, tally) for a, b in zip(bounds, bounds[1:])]:
            f.result()


def _write_stripes(store: Store, plan: _Plan, first: int, last: int, tally: _Tally) -> None:
    """Write the dirty stripes of ``[first, last)``, :data:`WRITE_SIZE` bytes at a time, then fsync.

    A helper thread assembles the next batch of stripes into one buffer while
    this one writes the previous batch from the other.
    """
    per = max(1, WRITE_SIZE // plan.align)
    batches = [(k, min(k + per, last)) for k in range(first, last, per)]
    size = min(per, last - first) * plan.align
    fd = os.open(plan.work, os.O_RDWR)
    try:
        with borrowed(size) as one, borrowed(size) as two, ThreadPoolExecutor(1) as helper:
            buffers = [one, two]
            ahead = helper.submit(_assemble_runs, store, plan, *batches[0], fd, buffers[0])
            for i in range(len(batches)):
                runs = ahead.result()
                if i + 1 < len(batches):
                    ahead = helper.submit(_assemble_runs, store, plan, *batches[i + 1], fd,
                                          buffers[(i + 1) % 2])
                for lo, view in runs:
                    _pwrite_all(fd, view, lo, plan.target, tally)
                if not store.renew(plan.target, plan.token, LEASE_SECONDS):
                    raise _LeaseLost()
        os.fsync(fd)
    finally:
        os.close(fd)


def _assemble_runs(store: Store, plan: _Plan, first: int, last: int, fd: int,
                   buf: memoryview) -> list[tuple[int, memoryview]]:
    """Assemble the runs of adjacent dirty stripes of ``[first, last)`` into ``buf``.

    Returns ``(offset, bytes)`` of each run, ready to be written; stripes with
    nothing to write (nothing newer than the clean watermark, or no data at
    all in a new file) split the runs and are skipped.
    """
    align = plan.align
    lo, hi = first * align, min(plan.size, last * align)
    extents = store.extents(plan.target, lo, hi, upto=plan.upto)   # in offset order
    runs: list[list[int]] = []      # [first, last) stripes; extents in offset order give them in order
    for e in extents:
        if plan.new or e.seq > plan.clean:
            a, b = max(e.start, lo) // align, (min(e.start + e.length, hi) - 1) // align + 1
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
    out = []
    for a, b in runs:
        rlo, rhi = a * align, min(hi, b * align)
        view = buf[rlo - lo:rhi - lo]
        inside = [e for e in extents if e.start < rhi and e.start + e.length > rlo]
        if not current_bytes(store, plan.target, rlo, view, extents=inside, bfs=BfsBytes(fd=fd, limit=plan.base)):
            raise FlushError(f"the tier's bytes of {plan.target} in [{rlo}, {rhi}) vanished during the flush "
                             f"(purged meanwhile?); run it again.")
        out.append((rlo, view))
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int, path: str, tally: _Tally) -> None:
    """Write ``data`` at ``offset`` (one call unless the OS writes short) and count the calls."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "the BFS accepted no bytes")
        for observer in write_observers:
            observer(path, offset + done, n)
        done += n
    tally.add(offset, data)
    _start_writeback(fd, offset, len(data))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Let the OS write ``[offset, offset + length)`` to disk now, not all at the final fsync.

    ``POSIX_FADV_DONTNEED`` starts writeback of the range's dirty pages
    without waiting and drops them from the page cache once clean (the tier
    still holds the bytes). The disk then works while the next batch is
    fetched, and the final fsync has little left to do. Advice only: a
    filesystem that does not take it costs nothing.
    """
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _pread_into(fd: int, out: memoryview, offset: int) -> None:
    """Read ``len(out)`` bytes at ``offset`` into ``out``; past the end of file ``out`` keeps its zeros."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            return
        done += n


def _verify_stripes(work: str, crcs: list[tuple[int, int, int]]) -> None:
    """Read back each written stripe and compare its CRC-32 with what was written."""
    if not crcs:
        return
    buf = memoryview(bytearray(max(n for _, n, _ in crcs)))
    fd = os.open(work, os.O_RDONLY)
    try:
        for offset, n, crc in crcs:
            view = buf[:n]
            view[:] = bytes(n)
            _pread_into(fd, view, offset)
            if zlib.crc32(view) != crc:
                raise FlushError(f"verification found different bytes at offset {offset} than were written")
    finally:
        os.close(fd)


def _finish(store: Store, plan: _Plan, verify: bool) -> FlushReport:
    """Set the final size, fsync, publish a new file, verify, and mark the snapshot clean (rank 0)."""
    fd = os.open(plan.work, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != plan.size:
            os.ftruncate(fd, plan.size)
        if plan.work != plan.target:
            give_final_attrs(fd, plan.target, plan.umask)   # visible only with its final mode
        os.fsync(fd)
    finally:
        os.close(fd)
    if plan.new:
        os.rename(plan.work, plan.target)
        dfd = os.open(os.path.dirname(plan.target), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    checksum = None
    if verify:
        actual = os.stat(plan.target).st_size
        if actual != plan.size:
            raise FlushError(f"verification found {actual} bytes on the BFS instead of {plan.size}")
        checksum = file_sha256(plan.target, plan.align)
    if not FlushLease(store, plan.target, plan.token, LEASE_SECONDS).mark_clean(plan.upto, plan.trunc):
        raise _LeaseLost()
    return FlushReport(path=plan.target, size=plan.size, checksum=checksum, upto=plan.upto)


def _abort(store: Store, plan: _Plan) -> None:
    """Undo what a failed flush can undo: remove its temporary file and give the lease back."""
    if plan.new:
        _quiet(lambda: os.unlink(plan.work))
    FlushLease(store, plan.target, plan.token, LEASE_SECONDS).release()


def _failed(target: str, cause: str) -> FlushError:
    """The error of a failed sync: its cause, and that nothing was lost."""
    return FlushError(f"sync of {target} failed: {cause}; the data stays dirty in the tier, "
                      f"fix the cause and run the sync again.")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Return the SHA-256 (hex) of the file at ``path``, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cause(exc: BaseException) -> str:
    """Return the cause of a flush failure as a short phrase."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]{where}"
    if isinstance(exc, TierConnectionError):
        return "the connection to the tier's server was lost"
    if isinstance(exc, _LeaseLost):
        return _LEASE_LOST
    if isinstance(exc, MpiburstError):
        return str(exc).rstrip(".")
    return f"{type(exc).__name__}: {exc}"


def _quiet(action: Callable[[], Any]) -> None:
    """Run a clean-up step whose failure must not hide the original error."""
    try:
        action()
    except (OSError, MpiburstError):
        pass
