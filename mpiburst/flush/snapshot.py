"""The snapshot a flush works on: lock the BFS path, take the lease, fix the upper mark, open a new version aside.

Rank 0 of a flush calls :func:`prepare`; the :class:`Plan` it returns is
shared with every flusher. A flush works on the file's sequence number when
it starts (or a commit's cut): writes that arrive later stay dirty for the
next flush. Two runs flushing one BFS path take turns on a :class:`BfsLock`
in its directory (one lock per directory: a commit of a thousand files in
one directory takes one lock, not a thousand); two flushers of one tier take turns on the file's flush lease
(:class:`~mpiburst.store.FlushLease`). The lease timings are read from this
module at each use, so a test may change them.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from typing import Any

from .. import drain
from ..errors import FlushError, MpiburstError, PathError
from ..perms import create_aside, current_umask, has_default_acl, make_dirs, open_aside
from ..store import FileMeta, FlushLease, Store
from .failures import Busy, cause, quiet

_log = logging.getLogger(__name__)

#: Lifetime of a flush lease; every flusher renews it after each write.
LEASE_SECONDS = 30.0
#: How long a blocking sync waits for another flusher of the same file to finish.
LEASE_WAIT = 120.0
#: Seconds a flush waits for a lease before it says so (a dead flusher's lease lasts up to LEASE_SECONDS).
LEASE_NOTE_AFTER = 1.0


@dataclass
class Plan:
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
    in_place: bool = False   # set by writes.seal: ``work`` was copied into ``target`` (another user's file)
    # A commit's own (never a plan shared between processes): ``work`` kept open from its creation to its seal
    # (one open of the new version, not three), and, for a target its directory's listing did not hold,
    # whether that directory has a default ACL (nothing looked up again at the seal).
    fd: int | None = None
    listed_acl: bool | None = None
    # ``work`` is the file under its final name in a commit's staging directory (mpiburst.flush.newdirs),
    # published by the rename of that directory, not by a rename of its own
    staged: bool = False
    # A commit's new file: the end of the bytes written into ``work`` (its size; the seal needs no stat)
    end: int | None = None


@dataclass(frozen=True)
class Listing:
    """One listing of a directory, made by a commit under the directory's lock, for all its files there."""

    names: frozenset[str]
    default_acl: bool

    @classmethod
    def of(cls, directory: str) -> Listing | None:
        """List ``directory`` (None if it cannot be listed: each file is then looked up)."""
        try:
            return cls(frozenset(os.listdir(directory)), has_default_acl(directory))
        except OSError:
            return None


def prepare(store: Store, target: str, align: int, cut: Any = None, wait: float | None = None,
            beside: list[str] | None = None, locked: bool = False, listing: Listing | None = None,
            stage_dir: str | None = None, taken: tuple[str, FileMeta] | None = None) -> Plan | None:
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

    ``wait``: seconds to wait for the lock and the lease held by another
    flush (default :data:`LEASE_WAIT`); 0 raises :class:`Busy` at once.
    ``beside``: the paths beside the target named ``.<name>.mpiburst-*``
    (stale new versions, drain files), from one listing of the directory
    made for many files before any of them was locked (a commit); default:
    looked up here, with the lock held (each lookup reads the directory).
    ``locked``: the caller holds the directory's :class:`BfsLock` (a commit
    takes each directory's once, :func:`lock_directories`, and made the
    directory); else it is made and locked here, and released by
    :func:`release_lock`.
    ``listing``: the target's directory as listed under that lock (a
    commit): a name it does not hold is a new file, not looked up, and the
    new version stays open in :attr:`Plan.fd` for the caller to write and
    seal (:func:`~mpiburst.flush.writes.seal` closes it).
    ``stage_dir``: the target's directory is new, staged there by the
    commit (:mod:`~mpiburst.flush.newdirs`, with an empty ``listing``): the
    new version is made there under the file's own name.
    ``taken``: the lease's token and the snapshot's record, taken already
    (a commit takes those of all its files at one go,
    :meth:`~mpiburst.store.Store.lease_and_begin`); released here on a failure, as one taken here.
    """
    # a commit's cut holds the record as read (its umask): no round trip; a record removed since is found below
    meta = cut if cut is not None else store.meta(target)
    if meta is None:
        raise PathError(f"{target} is not in the tier; there is nothing to sync.")
    umask = meta.umask if meta.umask is not None else current_umask()
    directory, name = os.path.split(target)
    lock: BfsLock | None = None
    if not locked:
        try:
            make_dirs(directory, umask)
            lock = BfsLock.take(directory, wait)
        except OSError as exc:
            raise FlushError(f"sync of {target} failed: {cause(exc)}; the data stays dirty in the tier, "
                             f"fix the cause and run the sync again.") from None
    lease: FlushLease | None = None
    try:
        if taken is None:
            lease = _take_lease(store, target, LEASE_WAIT if wait is None else wait)
            snap = lease.begin()
        else:
            lease = FlushLease(store, target, taken[0], LEASE_SECONDS)
            snap = taken[1]
        token = lease.token

        def nothing() -> None:
            assert lease is not None
            lease.release()
            if lock is not None:
                lock.release()

        if cut is not None:
            # purged or removed since the cut (no record: nothing of it to publish), or another flush went past
            # it; a file the BFS lacks is made even with no byte to write (an empty new file)
            if not snap.path or snap.clean >= cut.seq and (snap.clean > cut.clean or cut.trunc is None) and \
                    (snap.bfs or cut.bfs):
                nothing()
                return None
            snap = replace(cut, clean=snap.clean, trunc=snap.trunc, bfs=snap.bfs) if snap.clean > cut.clean else cut
        old: os.stat_result | None = None
        if listing is None or name in listing.names:   # else: not in its directory, listed under the lock
            with contextlib.suppress(FileNotFoundError):
                old = os.stat(target, follow_symlinks=False)
        work = os.path.join(stage_dir, name) if stage_dir is not None else \
            os.path.join(directory, f".{name}.mpiburst-{token}")
        # A new file's chunks written ahead by a drain while the application wrote it (mpiburst.drain).
        drained = beside is None or any(os.path.basename(p).startswith(f".{name}.mpiburst-drain-") for p in beside)
        claimed = drain.claim(target, work, align) if old is None and snap.trunc is None and drained else None
        if beside is None:
            beside = glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.mpiburst-*"))
        for stale in beside:
            if stale != work:   # left by a killed flusher or an unclaimed drain: we hold the lock and the lease
                quiet(lambda: os.unlink(stale))  # noqa: B023 - called at once
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise FlushError(f"{target} on the BFS is not a regular file (a link or a directory); remove it "
                             "or sync the data to another path.")
        if snap.unlooked and old is not None:
            # opened without a BFS lookup (mpiburst.lookup): the file found here extends it; the record learns
            # so now (a new file needs no call: the mark-clean says it is on the BFS)
            store.found_on_bfs(target, old.st_size)
            snap = replace(snap, unlooked=False, bfs=True, size=max(snap.size, old.st_size))
            if cut is not None and snap.seq <= snap.clean and snap.trunc is None:
                nothing()   # nothing written: the BFS file is the file (a commit makes no copy of it)
                return None
        base = 0
        if old is not None:
            base = old.st_size if snap.trunc is None else min(old.st_size, snap.trunc)
        fd = None
        if claimed is None and listing is not None:
            fd = open_aside(work, listing.default_acl)
        elif claimed is None:
            create_aside(work)
    except BaseException as exc:
        if lease is not None:
            lease.release()
        if lock is not None:
            lock.release()
        if isinstance(exc, MpiburstError):
            raise
        raise FlushError(f"sync of {target} failed: {cause(exc)}; the data stays dirty in the tier, "
                         f"fix the cause and run the sync again.") from None
    if lock is not None:
        _LOCKS[token] = lock
    return Plan(target=target, work=work, token=token, upto=snap.seq, clean=snap.clean, size=snap.size,
                 trunc=snap.trunc, align=align, base=base, new=old is None, umask=umask, claimed=claimed, fd=fd,
                 listed_acl=listing.default_acl if listing is not None and old is None else None,
                 staged=stage_dir is not None)


class BfsLock:
    """An exclusive ``flock`` on ``.mpiburst.lock`` in a BFS directory, held while files in it are flushed.

    Flushes of one BFS path by different runs (different tiers, whose leases
    do not see each other) take turns. The lock is one per directory, not one
    per file: creating and removing a lock file costs two metadata
    operations on the BFS (milliseconds each on a network filesystem), and a
    commit of many files in one directory takes it once
    (:func:`lock_directories`). Flushes of different files of one directory
    by different processes take turns too. The lock file is removed on
    release; a taker that locked a file already removed (its inode is no
    longer at the path) tries again.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @staticmethod
    def path_for(directory: str) -> str:
        """Return the path of the lock file of the BFS directory ``directory``."""
        return os.path.join(directory, LOCK_NAME)

    @classmethod
    def take(cls, directory: str, wait: float | None = None) -> BfsLock:
        """Lock ``directory``, waiting up to ``wait`` seconds (default :data:`LEASE_WAIT`).

        Raises
        ------
        FlushError
            If another flush of the same BFS path held it all that time
            (:class:`Busy` when ``wait`` is 0).
        """
        path = cls.path_for(directory)
        deadline = time.monotonic() + (LEASE_WAIT if wait is None else wait)
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if wait == 0:
                    raise Busy(f"another flush holds {path}, the lock of {directory}.") from None
                if time.monotonic() > deadline:
                    raise FlushError(f"another flush has held {path}, the lock of {directory}, for "
                                     f"over {LEASE_WAIT if wait is None else wait:.0f} s; wait for it to finish and "
                                     "try again.") from None
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


#: The name of a directory's :class:`BfsLock` file.
LOCK_NAME = ".mpiburst.lock"


def lock_directories(dirs: dict[str, int], wait: float | None = None) -> list[BfsLock]:
    """Make each directory of ``dirs`` (directory → umask) and lock it, in path order; return the locks.

    A commit's rank 0 holds them for all its ranks until every file is
    published. Path order: two commits waiting for each other's directories
    cannot deadlock. On a failure the locks taken are released and the
    error raised (:class:`Busy` when ``wait`` is 0 and another flush holds one).
    """
    locks: list[BfsLock] = []
    try:
        for directory in sorted(dirs):
            try:
                make_dirs(directory, dirs[directory])
                locks.append(BfsLock.take(directory, wait))
            except OSError as exc:
                raise FlushError(f"cannot lock {directory} for a flush: {cause(exc)}; the data stays dirty in "
                                 "the tier, fix the cause and run again.") from None
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


#: Locks held by flushes this process prepared, by lease token (released by writes.settle / writes.abort).
_LOCKS: dict[str, BfsLock] = {}


def release_lock(token: str) -> None:
    """Release the BFS lock :func:`prepare` took for the flush with lease ``token`` (once; later calls do nothing)."""
    lock = _LOCKS.pop(token, None)
    if lock is not None:
        lock.release()


def _take_lease(store: Store, target: str, wait: float) -> FlushLease:
    """Return the file's flush lease, waiting up to ``wait`` seconds for another flusher (0: :class:`Busy` at once)."""
    started = time.monotonic()
    deadline = started + wait
    noted = False
    while True:
        lease = store.flush_lease(target, LEASE_SECONDS)
        if lease is not None:
            return lease
        if wait == 0:
            raise Busy(f"another flush of {target} holds its lease.")
        if not noted and time.monotonic() > started + LEASE_NOTE_AFTER:
            _log.warning("sync of %s waits for its flush lease: another flush holds it, or one that died left "
                         "it, and then it expires within %.0f s.", target, LEASE_SECONDS)
            noted = True
        if time.monotonic() > deadline:
            raise FlushError(f"another flush of {target} has held it for over {wait:.0f} s; "
                             "wait for it to finish and try again.")
        time.sleep(0.05)
