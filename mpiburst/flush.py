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

Only stripes holding dirty data are planned: the flusher walks the file's
index, not its logical size, so a 5-byte write at offset 2**52 costs one
stripe of memory, and holes are never allocated on the BFS.

Durability: a flush never changes the BFS file in place. It writes a new
version aside as ``.<name>.mpiburst-<token>`` (for a file that exists, the
unchanged bytes are copied into it in the kernel, hole-aware, with
``copy_file_range``: a reflink on XFS or Btrfs, a server-side copy on NFS
4.2), fsyncs it and renames it over the final name, then fsyncs the
directory: a reader, or a crash, sees the old file or the new one, never a
mix. The new version gets the permissions a direct write by the application
would have given it, or the replaced file's (:mod:`mpiburst.perms`). A lock
file beside the target (``.<name>.mpiburst.lock``, ``flock``)
serialises flushes of one BFS path by different runs. Only after every
flusher's bytes are fsync'd is the snapshot marked clean
(:meth:`~mpiburst.store.FlushLease.mark_clean`, which checks the flush still
holds the file's lease). Any failure releases the lease, leaves the data dirty and
raises :class:`~mpiburst.errors.FlushError`; a later sync completes the job.

A new file may already be partly on the BFS when its flush starts: the drain
(:mod:`mpiburst.drain`) writes its full chunks into a data file while the
application writes. The flush claims that file as its new version (under its
lock and lease), keeps each drained chunk whose extents in the snapshot are
exactly the drained ones, and writes the rest; the chunks are then dealt out
to the flushers as the drain dealt them.

On a multi-node run (one server per node, :mod:`mpiburst.store.cluster_store`),
a collective flush whose ranks span several nodes plans *locality* first:
each stripe holding dirty data is written by a rank of the node whose server
holds most of its bytes, so each rank reads mostly from its own node's
server (:func:`_share_out`); a stripe whose bytes lie on several nodes is
still assembled from all of them, in sequence order.

Non-blocking syncs (``block=False``) are queued in the store's request queue
for the automatic engine (:mod:`mpiburst.engine`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import heapq
import json
import logging
import os
import secrets
import stat
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import drain, iostats
from .assembly import BfsBytes, current_bytes
from .buffers import borrowed
from .collective import on_root
from .errors import FlushError, MpiburstError, NodeLostError, PathError, TierConnectionError
from .overlay import Entry, Strided
from .paths import resolve
from .perms import create_aside, current_umask, give_final_attrs, make_dirs
from .progress import JobBytes
from .store import FlushLease, Store
from .tier import Tier

if TYPE_CHECKING:   # mpi4py is imported only by those who pass a communicator
    from mpi4py import MPI

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
    drained : int
        Bytes of the file the drain had already written while the application
        wrote it (:mod:`mpiburst.drain`) and this flush kept (not counted in ``bytes``).
    """

    path: str
    size: int = 0
    bytes: int = 0
    writes: int = 0
    write_sizes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    checksum: str | None = None
    upto: int = 0
    drained: int = 0


@dataclass
class _Plan:
    """The snapshot and target of one flush, decided by rank 0 and shared with every flusher."""

    target: str
    work: str          # the new version, written aside and renamed over ``target`` at the end
    token: str
    upto: int
    clean: int
    size: int
    trunc: int | None
    align: int
    base: int          # bytes of the existing BFS file kept (0 for a new file)
    new: bool          # no BFS file existed: every extent up to ``upto`` is written
    umask: int         # of the application: new files and directories get the modes it gives
    claimed: drain.Claim | None = None   # a finished drain's data file, now ``work``
    in_place: bool = False   # set by _seal: ``work`` was copied into ``target`` (another user's file)


class _Tally:
    """Write calls and bytes of one flusher (thread-safe: workers share it)."""

    def __init__(self, progress: Callable[[int], None] | None = None, verify: bool = False) -> None:
        self.bytes = 0
        self.drained = 0
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

def sync(path: str | os.PathLike, *, tier: Tier | None = None, comm: MPI.Comm | None = None, block: bool = True,
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
        Called with the bytes written so far, after each write, and with the
        flush's bytes once it is done. With ``comm``, the bytes of all its
        ranks: when rank 0 or this rank gives one, each rank adds its bytes
        to a counter in the tier at most every
        :data:`~mpiburst.progress.SHARE_EVERY` seconds and once its part is
        written (no collective call; :class:`~mpiburst.progress.JobBytes`),
        so another rank's bytes show up to that much later.

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
    tier = tier or Tier.current(comm)   # a connect failing on one rank fails every rank
    target = resolve(path, tier.bfs_root)
    if not block:
        enqueue(tier, "sync", target)
        return None
    comm = comm if comm is not None else _Solo()
    store = tier.store
    started = time.monotonic()

    def prepare() -> tuple[_Plan, bool]:
        try:
            recover(tier.bfs_root)   # a commit killed while renaming: finish it before touching its files
            plan = _prepare(store, target, tier.align)
            assert plan is not None      # without a cut there is always a plan
            return plan, progress is not None
        except (PathError, FlushError):
            raise
        except Exception as exc:   # a lost server, say: the data stays dirty, say so
            raise _failed(target, _cause(exc)) from None

    # rank 0 plans; every rank gets the plan (and whether rank 0 shows progress) or the error
    plan, root_progress = on_root(comm, prepare)

    ranges, error = _share_out(store, plan, comm)   # collective: every rank gets its stripes, or the same error
    job = None
    if comm.Get_size() > 1 and (root_progress or progress is not None):   # count the whole job's bytes
        job = JobBytes(lambda n: store.shared_pointer(plan.target, _progress_counter(plan), n) + n, progress)
    tally = _Tally(job.update if job is not None else progress, verify)
    if error is None:
        try:
            with FlushLease(store, plan.target, plan.token, LEASE_SECONDS):  # a failure gives the lease back,
                _write_run(store, plan, ranges, tally, max(1, workers))  # so the other flushers stop soon
                if verify:
                    _verify_stripes(plan.work, tally.crcs)
                if job is not None:
                    job.close()
        except Exception as exc:  # every cause becomes one line; the data stays dirty
            error = _cause(exc)
    outcomes = comm.allgather((error, tally.bytes, dict(tally.sizes), tally.drained, job is not None and job.shared))

    def finish() -> FlushReport:
        if any(o[4] for o in outcomes):   # every flusher is done: drop the progress counter
            with contextlib.suppress(MpiburstError):
                store.drop_shared_pointer(plan.target, _progress_counter(plan))
        # The root cause first: the other flushers only saw the lease the failing one released.
        failures = sorted((e for e, *_ in outcomes if e), key=lambda e: e == _LEASE_LOST)
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
    for o in outcomes:
        sizes.update(o[2])
    result.bytes = sum(o[1] for o in outcomes)
    result.drained = sum(o[3] for o in outcomes)
    result.writes = sum(sizes.values())
    result.write_sizes = dict(sorted(sizes.items()))
    result.seconds = time.monotonic() - started
    if progress is not None:
        progress(result.bytes)
    iostats.record_flush(store, result, plan.align, comm.Get_rank(), time.time() - result.seconds)
    return result


def _progress_counter(plan: _Plan) -> str:
    """Name the counter of a collective sync's bytes written (:class:`JobBytes`) among the file's atomic counters.

    The store's atomic counters per file and token are those of MPI shared
    file pointers (:meth:`Store.shared_pointer`); the flush lease's token
    keeps this one apart from every open's pointer and every other flush's.
    """
    return f"flush-progress:{plan.token}"


def commit(paths: Iterable[str] | None = None, *, tier: Tier | None = None, include_pinned: bool = True,
           select: Callable[[str], bool] | None = None,
           log: Callable[[str], None] | None = None,
           progress: Callable[[int], None] | None = None) -> list[FlushReport]:
    """Flush a consistent cut of the tier's files to the BFS, all or nothing.

    Every file's watermark is taken in one atomic step (:meth:`Store.cut
    <mpiburst.store.Store.cut>`), each dirty file is flushed exactly up to its
    mark (newer writes stay dirty), and the new versions are renamed into
    place only when all of them are written and fsync'd, under a journal
    (``.mpiburst-commit-<token>.json`` in the BFS root) that the next sync or
    commit completes if this one is killed while renaming. So if write B
    was issued after write A had completed (its file closed or synced), B on
    the BFS implies A on the BFS.

    Parameters
    ----------
    paths
        BFS paths to commit (files the tier does not hold are skipped);
        default every file of the tier.
    tier
        The run's :class:`~mpiburst.tier.Tier`; default :meth:`Tier.current`.
    include_pinned
        False: leave pinned files out (the automatic engine).
    select
        Called with each BFS path of the cut: only those it returns True for
        are committed. Choose files this way, not by a list made before the
        call: a file created after such a list but before the cut would be
        left out while later writes that depend on it are in.
    log
        Called with one line per file committed.
    progress
        Called with the bytes written to the BFS so far, over all files.

    Returns
    -------
    list of FlushReport
        One per file that was dirty in the cut, in path order.

    Raises
    ------
    FlushError
        If any file fails: nothing of the commit is published, every file
        stays dirty (or, if the commit failed while renaming, the next sync
        or commit finishes publishing it).
    """
    tier = tier or Tier.current()
    store = tier.store
    started, began = time.monotonic(), time.time()
    try:
        recover(tier.bfs_root)
        cut = store.cut()
    except Exception as exc:
        raise FlushError(f"commit failed: {_cause(exc)}; the data stays dirty in the tier, fix the cause and "
                         f"commit again.") from None
    wanted = cut if paths is None else {p: cut[p] for p in paths if p in cut}
    chosen = sorted(p for p, m in wanted.items()
                    if m.dirty and (include_pinned or not m.pinned) and (select is None or select(p)))
    plans: list[_Plan] = []
    tallies: list[_Tally] = []
    keeper = _LeaseKeeper(store)
    published = False
    try:
        for target in chosen:           # locks and leases in path order: two commits never deadlock
            plan = _prepare(store, target, tier.align, cut=cut[target])
            if plan is None:            # a later flush already put this file's cut on the BFS
                continue
            plans.append(plan)
            keeper.hold(plan)
        written = 0
        for plan in plans:
            tally = _Tally(_from(progress, written))
            _write_run(store, plan, [_stripe_range(plan, 0, 1)], tally, 1)
            written += tally.bytes
            _seal(plan)
            tallies.append(tally)
        keeper.check()
        journal = _write_journal(tier.bfs_root, plans)
        published = True
        _publish(plans)
        os.unlink(journal)
        keeper.stop()
        reports = [_settle(store, plan, False) for plan in plans]
    except Exception as exc:
        keeper.stop()
        for plan in plans:
            if published:   # the journal completes the renames at the next sync or commit
                FlushLease(store, plan.target, plan.token, LEASE_SECONDS).release()
                _release_lock(plan.token)
            else:
                _abort(store, plan)
        cause = exc if isinstance(exc, MpiburstError) else _cause(exc)
        raise FlushError(f"commit of {len(chosen)} files failed: {str(cause).rstrip('.')}; nothing of it was "
                         "published and the data stays dirty in the tier, fix the cause and commit again."
                         if not published else
                         f"commit of {len(chosen)} files failed while publishing them: {_cause(exc)}; the next "
                         "sync or commit completes it.") from None
    for report, tally in zip(reports, tallies):
        report.bytes, report.writes, report.drained = tally.bytes, sum(tally.sizes.values()), tally.drained
        report.write_sizes = dict(sorted(tally.sizes.items()))
        report.seconds = time.monotonic() - started
        iostats.record_flush(store, report, tier.align, 0, began)   # each file: the whole commit's time
        if log is not None:
            log(f"committed {report.path}: {report.bytes} bytes in {report.writes} writes")
    return reports


def _from(progress: Callable[[int], None] | None, base: int) -> Callable[[int], None] | None:
    """Return a progress callback that adds ``base`` (the bytes of the files before) to a file's bytes."""
    if progress is None:
        return None
    report = progress
    return lambda done: report(base + done)


class _LeaseKeeper:
    """Renews the leases of every file a commit holds, from a thread, until stopped."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._plans: list[_Plan] = []
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mpiburst-lease-keeper")
        self._thread.start()

    def hold(self, plan: _Plan) -> None:
        self._plans.append(plan)

    def check(self) -> None:
        """Raise if a lease was lost meanwhile."""
        if self._lost is not None:
            raise _LeaseLost()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            for plan in list(self._plans):
                try:
                    ok = self._store.renew(plan.target, plan.token, LEASE_SECONDS)
                except Exception:  # noqa: BLE001 - the commit reports the cause when it next talks to the tier
                    ok = True
                if not ok:
                    self._lost = plan.target


_JOURNAL = ".mpiburst-commit-{}.json"


def _write_journal(bfs_root: str, plans: list[_Plan]) -> str:
    """Write and fsync the list of renames a commit is about to make; return its path."""
    path = os.path.join(bfs_root, _JOURNAL.format(secrets.token_hex(8)))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        renames = [[p.work, p.target] for p in plans if not p.in_place]   # those are written already
        os.write(fd, json.dumps({"renames": renames}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(bfs_root)
    return path


def recover(bfs_root: str) -> int:
    """Finish the renames of commits killed while publishing; return how many journals were completed.

    A journal whose files are locked belongs to a commit still running and
    is left to it. Run by every sync and commit before it starts.
    """
    done = 0
    for journal in glob.glob(os.path.join(glob.escape(bfs_root), _JOURNAL.format("*"))):
        try:
            with open(journal, "rb") as f:
                renames = [(str(w), str(t)) for w, t in json.load(f)["renames"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not all(_journal_entry_ok(bfs_root, w, t) for w, t in renames):
            continue                      # not one of ours: leave it alone
        locks: list[BfsLock] = []
        try:
            for _, target in renames:
                locks.append(BfsLock.take(target, wait=0))
        except (FlushError, OSError):
            for lock in locks:
                lock.release()
            continue                      # its commit is still running
        try:
            for work, target in renames:
                with contextlib.suppress(FileNotFoundError):   # renamed before the commit was killed
                    os.rename(work, target)
            for directory in dict.fromkeys(os.path.dirname(t) for _, t in renames):
                _fsync_dir(directory)
            os.unlink(journal)
            done += 1
        finally:
            for lock in locks:
                lock.release()
    return done


def _journal_entry_ok(bfs_root: str, work: str, target: str) -> bool:
    """True if ``work`` is a flush's new version of ``target``, beside it, inside ``bfs_root``."""
    root = os.path.join(os.path.realpath(bfs_root), "")
    directory, name = os.path.split(target)
    return (target.startswith(root) and os.path.dirname(work) == directory
            and os.path.basename(work).startswith(f".{name}.mpiburst-"))


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def enqueue(tier: Tier, op: str, path: str, **fields: Any) -> None:
    """Queue a request (``op`` = ``"sync"`` or ``"prestage"``) in the tier for the engine."""
    tier.store.enqueue(json.dumps(dict(op=op, path=path, time=time.time(), **fields)).encode())


# ----------------------------------------------------------------------------- the steps

def _prepare(store: Store, target: str, align: int, cut: Any = None) -> _Plan | None:
    """Lock the BFS path, take the lease, snapshot the file and create its new version aside (rank 0 only).

    ``cut`` (a :class:`~mpiburst.store.FileMeta` taken by a commit) fixes the
    snapshot's upper mark; without it the snapshot is the file's state now.
    Another flush (the engine's, another commit) may have run between the
    cut and this lease: what is clean, and the truncation still to apply,
    are then taken from the file's record now, since the extents it made
    clean may already be purged and their bytes are on the BFS. Returns None
    (lock and lease given back) when that flush already went past the cut:
    rewriting the file from the older cut would replace newer bytes on the
    BFS with older ones.
    """
    meta = store.meta(target)
    if meta is None and cut is not None:
        return None                     # purged or removed since the cut: nothing of it to publish
    if meta is None:
        raise PathError(f"{target} is not in the tier; there is nothing to sync.")
    umask = meta.umask if meta.umask is not None else current_umask()
    directory, name = os.path.split(target)
    try:
        make_dirs(directory, umask)
        lock = BfsLock.take(target)
    except OSError as exc:
        raise FlushError(f"sync of {target} failed: {_cause(exc)}; the data stays dirty in the tier, "
                         f"fix the cause and run the sync again.") from None
    lease: FlushLease | None = None
    try:
        lease = _take_lease(store, target)
        token = lease.token
        snap = lease.begin()
        if cut is not None:
            if snap.clean >= cut.seq and (snap.clean > cut.clean or cut.trunc is None):
                lease.release()
                lock.release()
                return None
            snap = replace(cut, clean=snap.clean, trunc=snap.trunc) if snap.clean > cut.clean else cut
        try:
            old: os.stat_result | None = os.stat(target, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        work = os.path.join(directory, f".{name}.mpiburst-{token}")
        # A new file's chunks written ahead by a drain while the application wrote it (mpiburst.drain).
        claimed = drain.claim(target, work, align) if old is None and snap.trunc is None else None
        for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.mpiburst-*")):
            if stale != work:   # left by a killed flusher or an unclaimed drain: we hold the lock and the lease
                _quiet(lambda: os.unlink(stale))  # noqa: B023 - called at once
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise FlushError(f"{target} on the BFS is not a regular file (a link or a directory); remove it "
                             "or sync the data to another path.")
        base = 0
        if old is not None:
            base = old.st_size if snap.trunc is None else min(old.st_size, snap.trunc)
        if claimed is None:
            create_aside(work)
    except BaseException as exc:
        if lease is not None:
            lease.release()
        lock.release()
        if isinstance(exc, MpiburstError):
            raise
        raise FlushError(f"sync of {target} failed: {_cause(exc)}; the data stays dirty in the tier, "
                         f"fix the cause and run the sync again.") from None
    _LOCKS[token] = lock
    return _Plan(target=target, work=work, token=token, upto=snap.seq, clean=snap.clean, size=snap.size,
                 trunc=snap.trunc, align=align, base=base, new=old is None, umask=umask, claimed=claimed)


class BfsLock:
    """An exclusive ``flock`` on ``.<name>.mpiburst.lock`` beside a BFS file, held while it is flushed.

    Flushes of one BFS path by different runs (different tiers, whose leases
    do not see each other) take turns. The lock file is removed on release;
    a taker that locked a file already removed (its inode is no longer at
    the path) tries again.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @staticmethod
    def path_for(target: str) -> str:
        """Return the lock file's path for the BFS file ``target``."""
        directory, name = os.path.split(target)
        return os.path.join(directory, f".{name}.mpiburst.lock")

    @classmethod
    def take(cls, target: str, wait: float | None = None) -> BfsLock:
        """Lock ``target``, waiting up to ``wait`` seconds (default :data:`LEASE_WAIT`).

        Raises
        ------
        FlushError
            If another flush of the same BFS path held it all that time.
        """
        path = cls.path_for(target)
        deadline = time.monotonic() + (LEASE_WAIT if wait is None else wait)
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise FlushError(f"another run has been flushing {target} for over "
                                     f"{LEASE_WAIT if wait is None else wait:.0f} s (it holds {path}); wait for it to "
                                     "finish and try again.") from None
                time.sleep(0.05)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)  # locked a file its holder removed meanwhile: take the new one

    def release(self) -> None:
        """Remove the lock file and unlock (once; later calls do nothing)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(fd)


#: Locks held by flushes this process prepared, by lease token (released by _finish / _abort).
_LOCKS: dict[str, BfsLock] = {}


def _release_lock(token: str) -> None:
    lock = _LOCKS.pop(token, None)
    if lock is not None:
        lock.release()


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


def _stripe_range(plan: _Plan, rank: int, nprocs: int) -> tuple[int, int]:
    """Return the stripes ``[first, last)`` flusher ``rank`` of ``nprocs`` writes."""
    nstripes = -(-plan.size // plan.align)
    return rank * nstripes // nprocs, (rank + 1) * nstripes // nprocs


def _my_stripes(plan: _Plan, rank: int, nprocs: int) -> list[tuple[int, int]]:
    """Return the stripe ranges flusher ``rank`` of ``nprocs`` writes.

    A contiguous share (:func:`_stripe_range`), except into a drain's claimed
    data file: there the drain's chunks are dealt out as the drain dealt
    them (chunk ``c`` to rank ``c % nprocs``), so what the drain left undone
    is shared evenly.
    """
    if plan.claimed is None or nprocs == 1:
        return [_stripe_range(plan, rank, nprocs)]
    per = plan.claimed.chunk // plan.align
    nstripes = -(-plan.size // plan.align)
    return [(c * per, min(nstripes, (c + 1) * per)) for c in range(rank, -(-nstripes // per), nprocs)]


# ----------------------------------------------------------------------------- locality (several nodes)

#: Environment variable: ``0`` turns flush locality off (each rank then writes a contiguous share of the stripes).
LOCALITY_ENV = "MPIBURST_FLUSH_LOCALITY"
#: At most this many domains per file when planning locality: a larger file's domains are several stripes.
MAX_DOMAINS = 1 << 16


def _share_out(store: Store, plan: _Plan, comm: Any) -> tuple[list[tuple[int, int]], str | None]:
    """Return the stripe ranges this rank writes, or the error every rank gets instead (collective).

    On one node, in a serial flush, into a drain's data file, or with
    ``$MPIBURST_FLUSH_LOCALITY=0``: :func:`_my_stripes`. When the flushing
    ranks span several nodes of a :class:`~mpiburst.store.cluster_store.ClusterStore`,
    the stripes are cut into domains (one stripe each, or a few for a file
    of more than :data:`MAX_DOMAINS` stripes); each node's first rank lists
    the index of its own server (the first rank of the communicator lists
    those of nodes with no rank in it) and counts, per domain, the bytes of
    the snapshot held there; every rank then derives the same assignment
    (:func:`_assign`): a domain holding dirty data is written by a rank of
    the node holding most of its bytes, the rest (holes, bytes already on
    the BFS) by the usual contiguous shares. Which rank writes a stripe never
    changes its bytes: each is assembled from every node that holds part of
    it, in sequence order, so overlapping writes of different nodes still
    resolve in arrival order.
    """
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    default = _my_stripes(plan, rank, nprocs)
    if nprocs == 1 or plan.claimed is not None:
        return default, None
    local = getattr(store, "local", None) if os.environ.get(LOCALITY_ENV, "1") != "0" else None
    where: list[int | None] = comm.allgather(local if hasattr(store, "node_index") else None)
    if None in where or len(set(where)) < 2:
        return default, None
    per = _domain_stripes(plan)
    leaders = {node: where.index(node) for node in set(where)}   # the first rank of each node
    error: str | None = None
    held: dict[int, tuple[dict[int, int], set[int]]] = {}
    try:
        for node in store.holders(plan.target):   # type: ignore[attr-defined]
            if leaders.get(node, 0) == rank:
                held[node] = _holdings(store.node_index(plan.target, node), plan, per)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - every rank raises the same error below
        error = _cause(exc)
    parts = comm.allgather((error, held))
    errors = [e for e, _ in parts if e]
    if errors:
        return [], errors[0]
    every: dict[int, tuple[dict[int, int], set[int]]] = {}
    for _, h in parts:
        every.update(h)
    return _assign(plan, per, [w for w in where if w is not None], every, rank), None


def _domain_stripes(plan: _Plan) -> int:
    """Return the stripes per locality domain of ``plan``'s file: 1, or more to keep at most :data:`MAX_DOMAINS`."""
    nstripes = -(-plan.size // plan.align)
    return max(1, -(-nstripes // MAX_DOMAINS))


def _holdings(entries: Iterable[Entry], plan: _Plan, per: int) -> tuple[dict[int, int], set[int]]:
    """Count one node's bytes of the snapshot per domain of ``per`` stripes; return them and the dirty domains.

    A domain is dirty when an entry of the snapshot in it is newer than the
    clean watermark (any entry, for a new file): only those are written,
    the rest is the BFS file's bytes. A strided run's block counts in the
    domain it starts in (the figure only chooses a writer), but marks each
    domain it touches dirty.
    """
    span = per * plan.align
    counts: Counter[int] = Counter()
    dirty: set[int] = set()
    for e in entries:
        if e.seq > plan.upto or e.start >= plan.size:
            continue
        fresh = plan.new or e.seq > plan.clean
        if isinstance(e, Strided):
            starts = e.start + np.arange(e.nblocks, dtype=np.int64) * e.stride
            starts = starts[starts < plan.size]
            doms, n = np.unique(starts // span, return_counts=True)
            for d, c in zip(doms.tolist(), n.tolist()):
                counts[d] += c * e.length
            if fresh:
                dirty.update(doms.tolist())
                dirty.update(np.unique((np.minimum(starts + e.length, plan.size) - 1) // span).tolist())
            continue
        end = min(e.end, plan.size)
        for d in range(e.start // span, (end - 1) // span + 1):
            counts[d] += min(end, (d + 1) * span) - max(e.start, d * span)
            if fresh:
                dirty.add(d)
    return dict(counts), dirty


def _assign(plan: _Plan, per: int, where: list[int], held: dict[int, tuple[dict[int, int], set[int]]],
            rank: int) -> list[tuple[int, int]]:
    """Return the stripe ranges rank ``rank`` writes, from every node's holdings (the same on every rank).

    ``where[r]`` is rank ``r``'s node; ``held[k]`` node ``k``'s bytes per
    domain and dirty domains (:func:`_holdings`). A dirty domain goes to the
    node with a rank here that holds most of its bytes (ties rotate with the
    domain, so an evenly mixed file is shared by every node); a node's
    domains are dealt to its ranks in contiguous runs, in order. Every other
    stripe goes to the rank whose contiguous share (:func:`_stripe_range`)
    it lies in. So each stripe is written by exactly one rank.
    """
    nstripes = -(-plan.size // plan.align)
    ranks: dict[int, list[int]] = {}
    for r, node in enumerate(where):
        ranks.setdefault(node, []).append(r)
    order = sorted(ranks)
    owned: dict[int, list[int]] = {node: [] for node in order}
    for d in sorted(set().union(*(dirty for _, dirty in held.values()))):
        if d * per >= nstripes:
            continue
        best = max(order, key=lambda k: (held[k][0].get(d, 0) if k in held else 0, -((k - d) % len(order))))
        if best in held and held[best][0].get(d, 0) > 0:
            owned[best].append(d)
    mine: list[tuple[int, int]] = []
    node = where[rank]
    domains, peers = owned[node], ranks[node]
    i, m = peers.index(rank), len(peers)
    for d in domains[i * len(domains) // m:(i + 1) * len(domains) // m]:
        mine.append((d * per, min(nstripes, (d + 1) * per)))
    first, last = _stripe_range(plan, rank, len(where))
    taken = sorted(d for ds in owned.values() for d in ds)
    pos = first
    for d in taken:                     # my contiguous share, minus the domains a node took
        a, b = d * per, min(nstripes, (d + 1) * per)
        if b <= pos:
            continue
        if a >= last:
            break
        if a > pos:
            mine.append((pos, a))
        pos = b
    if pos < last:
        mine.append((pos, last))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(mine):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _write_run(store: Store, plan: _Plan, ranges: list[tuple[int, int]], tally: _Tally, workers: int) -> None:
    """Copy the kept bytes of the stripe ``ranges``, write their dirty runs (in ``workers`` threads), fsync."""
    ranges = [(first, last) for first, last in ranges if first < last]
    if not ranges:
        return
    src = os.open(plan.target, os.O_RDONLY | os.O_NOFOLLOW) if plan.base else None
    fd = os.open(plan.work, os.O_RDWR | os.O_NOFOLLOW)
    try:
        runs: list[tuple[int, int]] = []
        for first, last in ranges:
            if src is not None:
                copy_data(src, fd, first * plan.align, min(last * plan.align, plan.base))
            mine = list(_dirty_runs(store, plan, first, last))
            if plan.claimed is not None:
                fresh = drain.fresh_chunks(store, plan.target, plan.claimed, plan.upto, plan.size,
                                           first * plan.align, last * plan.align)
                mine = drain.runs_to_write(mine, plan.claimed, fresh, plan.align, first, last)
                tally.drained += sum(min(last * plan.align, plan.size, (c + 1) * plan.claimed.chunk)
                                     - max(first * plan.align, c * plan.claimed.chunk) for c in fresh)
            runs.extend(mine)
        total = sum(b - a for a, b in runs)
        if workers == 1 or total < 2:
            _write_stripes(store, plan, runs, src, fd, tally)
        else:
            n = min(workers, total)
            parts = list(_batches(runs, -(-total // n)))
            with ThreadPoolExecutor(len(parts)) as pool:
                for f in [pool.submit(_write_stripes, store, plan, part, src, fd, tally) for part in parts]:
                    f.result()
        os.fsync(fd)
    finally:
        os.close(fd)
        if src is not None:
            os.close(src)


def _dirty_runs(store: Store, plan: _Plan, first: int, last: int) -> Iterator[tuple[int, int]]:
    """Yield the runs ``[a, b)`` of adjacent stripes of ``[first, last)`` holding data to write, in order.

    A stripe is written when an extent of the snapshot in it is dirty (newer
    than the clean watermark), or, for a new file, when any extent lies in
    it. The runs come from a walk of the file's index (in pages, so memory
    stays bounded), never from the file's size: holes cost nothing. A
    strided run costs one step when its stride is at most a stripe (it then
    touches every stripe of its span), else one per stripe it touches.
    """
    align = plan.align
    lo, hi = first * align, min(plan.size, last * align)
    run: list[int] | None = None
    ahead: list[tuple[int, int]] = []      # stripe runs of entries seen, not yet merged (a heap)
    for e in _walk_extents(store, plan.target, lo, hi):
        if e.seq > plan.upto or not (plan.new or e.seq > plan.clean):
            continue
        while ahead and ahead[0][0] <= max(e.start, lo) // align:   # no later entry starts before these
            run = yield from _merge(run, heapq.heappop(ahead))
        for stripes in _stripes(e, lo, hi, align):
            heapq.heappush(ahead, stripes)
    while ahead:
        run = yield from _merge(run, heapq.heappop(ahead))
    if run is not None:
        yield run[0], run[1]


def _merge(run: list[int] | None, stripes: tuple[int, int]) -> Generator[tuple[int, int], None, list[int]]:
    """Add the stripes ``[a, b)`` to the open ``run``; yield the run when they do not touch it. Return the open run."""
    a, b = stripes
    if run is not None and a <= run[1]:
        run[1] = max(run[1], b)
        return run
    if run is not None:
        yield run[0], run[1]
    return [a, b]


def _stripes(e: Entry, lo: int, hi: int, align: int) -> list[tuple[int, int]]:
    """Return the runs of stripes ``[a, b)`` that entry ``e`` has bytes in, within ``[lo, hi)``."""
    if not isinstance(e, Strided):
        a, b = max(e.start, lo), min(e.start + e.length, hi)
        return [(a // align, (b - 1) // align + 1)] if a < b else []
    i, j = e.span(lo, hi)
    if i >= j:
        return []
    if e.stride <= align:                  # a block starts in every stripe of the span
        a, b = max(e.start + i * e.stride, lo), min(e.start + (j - 1) * e.stride + e.length, hi)
        return [(a // align, (b - 1) // align + 1)]
    starts = e.start + np.arange(i, j, dtype=np.int64) * e.stride
    a_s = np.maximum(starts, lo) // align
    b_s = (np.minimum(starts + e.length, hi) - 1) // align + 1
    return list(zip(a_s.tolist(), b_s.tolist()))


def _walk_extents(store: Store, path: str, lo: int, hi: int, page: int = 4096) -> Iterator[Entry]:
    """Yield the index entries of ``path`` overlapping ``[lo, hi)`` in offset order, a page at a time.

    Pages are taken by offset, not by rank in the index, so extents removed
    meanwhile (a purge of clean data) make none of the others be skipped; an
    extent may be yielded twice, which the callers do not mind. Strided runs
    come as one entry each.
    """
    yield from store.index(path, lo, lo + 1)         # those that start before ``lo`` and reach into it
    pos = lo
    while pos < hi:
        found = store.extents_from(path, pos, page)
        for e in found:
            if e.start >= hi:
                return
            yield e
        if len(found) < page:
            return
        if found[-1].start == pos:                    # a page of extents that all start at ``pos``
            page *= 2
        pos = found[-1].start


def _batches(runs: list[tuple[int, int]], per: int) -> Iterator[list[tuple[int, int]]]:
    """Group stripe runs into batches of at most ``per`` stripes (a long run is cut into pieces)."""
    batch: list[tuple[int, int]] = []
    used = 0
    for a, b in runs:
        while a < b:
            take = min(b - a, per - used)
            batch.append((a, a + take))
            used += take
            a += take
            if used == per:
                yield batch
                batch, used = [], 0
    if batch:
        yield batch


def _write_stripes(store: Store, plan: _Plan, runs: list[tuple[int, int]], src: int | None, fd: int,
                   tally: _Tally) -> None:
    """Write the stripe ``runs`` into the new version, :data:`WRITE_SIZE` bytes at a time.

    A helper thread assembles the next batch of stripes into one buffer while
    this one writes the previous batch from the other.
    """
    if not runs:
        return
    per = max(1, WRITE_SIZE // plan.align)
    batches = list(_batches(runs, per))
    size = min(per, sum(b - a for a, b in runs)) * plan.align
    with borrowed(size) as one, borrowed(size) as two, ThreadPoolExecutor(1) as helper:
        buffers = [one, two]
        ahead = helper.submit(_assemble_runs, store, plan, batches[0], src, buffers[0])
        for i in range(len(batches)):
            pieces = ahead.result()
            if i + 1 < len(batches):
                ahead = helper.submit(_assemble_runs, store, plan, batches[i + 1], src, buffers[(i + 1) % 2])
            for lo, view in pieces:
                _pwrite_all(fd, view, lo, plan.target, tally)
            if not store.renew(plan.target, plan.token, LEASE_SECONDS):
                raise _LeaseLost()


def _assemble_runs(store: Store, plan: _Plan, runs: list[tuple[int, int]], src: int | None,
                   buf: memoryview) -> list[tuple[int, memoryview]]:
    """Assemble the stripe ``runs`` (at most one buffer's worth) into ``buf``; return ``(offset, bytes)`` of each."""
    align = plan.align
    out = []
    used = 0
    for a, b in runs:
        rlo, rhi = a * align, min(plan.size, b * align)
        view = buf[used:used + rhi - rlo]
        used += rhi - rlo
        bfs = BfsBytes(fd=src, limit=plan.base) if src is not None else None
        if not current_bytes(store, plan.target, rlo, view, upto=plan.upto, bfs=bfs):
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
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


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


def copy_data(src: int, dst: int, lo: int, hi: int) -> None:
    """Copy the bytes ``[lo, hi)`` of ``src`` to the same offsets of ``dst``, holes left as holes.

    Data segments are found with ``SEEK_DATA`` / ``SEEK_HOLE`` and copied in
    the kernel (``copy_file_range``: a reflink on XFS and Btrfs, a
    server-side copy on NFS 4.2); where that is not available, through a
    bounded buffer.
    """
    pos = lo
    while pos < hi:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
            end = min(os.lseek(src, start, os.SEEK_HOLE), hi)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # only a hole is left
                return
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = pos, hi              # no hole detection here: copy it all
        if start >= hi:
            return
        _copy_range(src, dst, start, end)
        pos = end


def _copy_range(src: int, dst: int, lo: int, hi: int) -> None:
    """Copy ``[lo, hi)`` of ``src`` to ``dst`` at the same offsets (short only at the source's end)."""
    pos = lo
    try:
        while pos < hi:
            n = os.copy_file_range(src, dst, min(hi - pos, 1 << 30), pos, pos)
            if n == 0:
                return
            pos += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    with borrowed(min(WRITE_SIZE, hi - pos)) as buf:
        while pos < hi:
            view = buf[:min(len(buf), hi - pos)]
            n = os.preadv(src, [view], pos)
            if n == 0:
                return
            done = 0
            while done < n:
                done += os.pwrite(dst, view[done:n], pos + done)
            pos += n


def _finish(store: Store, plan: _Plan, verify: bool) -> FlushReport:
    """Set the final size, fsync, rename the new version into place, verify, mark the snapshot clean (rank 0)."""
    _seal(plan)
    _publish([plan])
    return _settle(store, plan, verify)


def _seal(plan: _Plan) -> None:
    """Give the new version its final size and attributes, and fsync it.

    When the flusher may not give it the owner or group of the file it
    replaces (another user's file it may write, in a shared project
    directory), a rename would change who owns that file: its new bytes are
    copied into the existing file instead, as a direct write would rewrite it
    (``plan.in_place``; without the rename's all-or-nothing, but the data
    stays dirty in the tier until this is done, so a failure is retried).
    """
    fd = os.open(plan.work, os.O_RDWR | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size != plan.size:
            os.ftruncate(fd, plan.size)
        if give_final_attrs(fd, plan.target, plan.umask):   # visible only with its final mode (mpiburst.perms)
            os.fsync(fd)
        else:
            _rewrite_in_place(fd, plan)
            plan.in_place = True
    finally:
        os.close(fd)


def _rewrite_in_place(src: int, plan: _Plan) -> None:
    """Copy the new version open as ``src`` over the bytes of the existing ``plan.target``, trim and fsync it."""
    dst = os.open(plan.target, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        _copy_range(src, dst, 0, plan.size)   # every byte: a hole of the new version is zeros to write here
        os.ftruncate(dst, plan.size)
        os.fsync(dst)
    finally:
        os.close(dst)


def _publish(plans: list[_Plan]) -> None:
    """Rename each new version over its final name, then fsync the directories."""
    for plan in plans:
        if plan.in_place:
            os.unlink(plan.work)
            continue
        os.rename(plan.work, plan.target)
    for directory in dict.fromkeys(os.path.dirname(p.target) for p in plans):
        _fsync_dir(directory)


def _settle(store: Store, plan: _Plan, verify: bool) -> FlushReport:
    """After the rename: verify, mark the snapshot clean, and unlock the BFS path."""
    try:
        checksum = None
        if verify:
            actual = os.stat(plan.target).st_size
            if actual != plan.size:
                raise FlushError(f"verification found {actual} bytes on the BFS instead of {plan.size}")
            checksum = file_sha256(plan.target, plan.align)
        if not FlushLease(store, plan.target, plan.token, LEASE_SECONDS).mark_clean(plan.upto, plan.trunc):
            raise _LeaseLost()
    finally:
        _release_lock(plan.token)
    return FlushReport(path=plan.target, size=plan.size, checksum=checksum, upto=plan.upto)


def _abort(store: Store, plan: _Plan) -> None:
    """Undo what a failed flush can undo: remove its new version, give the lease and the lock back."""
    _quiet(lambda: os.unlink(plan.work))
    FlushLease(store, plan.target, plan.token, LEASE_SECONDS).release()
    _release_lock(plan.token)


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
    if isinstance(exc, NodeLostError):   # a multi-node run: say which server, and whose data it held
        held = f" holding data of {', '.join(exc.files)}" if exc.files else ""
        return f"the connection to the tier server of node {exc.node}{held} was lost"
    if isinstance(exc, TierConnectionError):
        return "the connection to the tier's server was lost"
    if isinstance(exc, _LeaseLost):
        return _LEASE_LOST
    if isinstance(exc, MpiburstError):
        return str(exc).rstrip(".")
    return f"{type(exc).__name__}: {exc}"


def _quiet(action: Callable[[], Any]) -> None:
    """Run a clean-up step whose failure must not hide the original error."""
    with contextlib.suppress(OSError, MpiburstError):
        action()
