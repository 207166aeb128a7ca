"""A commit of many files at once: the ranks share the cut's files, each flushes its share with a pool of threads.

A file-per-process checkpoint is hundreds of small files; flushed one after
the other, each costs a few tier round trips, a few BFS metadata calls and
an fsync, 10 to 60 ms on a network filesystem. Here every rank of the
communicator takes every ``size``-th file of the cut, and flushes its
share in :func:`threads` threads, in steps that every rank ends together
(:func:`~mpiburst.collective.together`: a failure on one rank is raised on
every rank):

1. rank 0 locks each directory of the cut once (:class:`~mpiburst.flush.snapshot.BfsLock`,
   one lock per directory, held for every rank until the end); each rank
   lists each of its directories once, under that lock (the leftovers of
   earlier flushes, which targets exist, whether new files inherit an ACL),
   not once per file. A directory that does not exist yet is not made:
   rank 0 locks the parent of its topmost missing directory instead and
   stages it (:mod:`~mpiburst.flush.newdirs`), and its files are written
   there under their final names;
2. each rank takes the leases of all its files and begins their
   snapshots at one go (:meth:`~mpiburst.store.Store.lease_and_begin`: one
   round trip on a server, not two per file) and lists the index of its
   small files (:meth:`~mpiburst.store.Store.index_many`); then each file, in one task
   of the pool: prepared without waiting (new version aside; a name the
   listing did not hold is not looked up), its new version written and
   fsync'd through the one descriptor that created it: a new file costs
   the BFS a create, a write, a chmod, an fsync and, at 4., a rename, and
   the tier one round trip, the fetch of its bytes;
3. rank 0 fsyncs the staged directories and writes the commit's journal,
   naming every rank's renames and each staging directory's;
4. every rank renames its new versions into place, rank 0 each staging
   directory (one rename per new directory, whatever its files), then they
   fsync each parent once; rank 0 removes the journal;
5. mark every file's snapshot clean, each rank its files at one go
   (:meth:`~mpiburst.store.Store.mark_clean_many`; a lease lost meanwhile
   leaves its file dirty and fails the commit, as at 4.).

The promises of :func:`mpiburst.flush.commit` hold as for one process:
one cut (taken by rank 0), nothing renamed before every file of every rank
is written and fsync'd, the journal before the first rename. A failure
before the journal aborts every rank's files and removes the staging
directories (nothing published, all stays dirty); after it, the journal completes the renames at the next sync
or commit. If another flush holds one of the files (its lock or its lease),
waiting for it while holding the others could deadlock with that flush: the
attempt is given up on every rank (:class:`~mpiburst.flush.failures.Busy`)
and rank 0 commits the whole cut alone, taking the directories' locks and
the files' leases in path order and waiting for each as a sync does.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from ..collective import on_root, together
from ..errors import FlushError, MpiburstError
from ..overlay import Entry
from ..perms import current_umask
from ..store import FileMeta, FlushLease, Store
from ..tier import Tier
from . import locality, newdirs, snapshot, writes
from .failures import Busy, LeaseLost, cause
from .journal import write_journal
from .snapshot import Plan

if TYPE_CHECKING:   # mpi4py is imported only by those who pass a communicator
    from mpi4py import MPI

T = TypeVar("T")
R = TypeVar("R")

#: Threads each rank flushes its share of a commit with (``MPIBURST_COMMIT_THREADS`` overrides).
THREADS = 8
#: Leftovers of earlier flushes beside a target: ``.<name>`` then this, then a token.
_ASIDE = ".mpiburst-"


def threads() -> int:
    """Return the threads per rank of a commit: ``$MPIBURST_COMMIT_THREADS``, else :data:`THREADS`."""
    value = os.environ.get("MPIBURST_COMMIT_THREADS", "")
    try:
        return max(1, int(value)) if value else THREADS
    except ValueError:
        raise FlushError(f"MPIBURST_COMMIT_THREADS={value!r} is not a number of threads; give e.g. 8.") from None


def flush_cut(tier: Tier, chosen: Sequence[tuple[str, FileMeta]], comm: MPI.Comm | None,
              done: Callable[[Plan, writes.Tally], R], progress: Callable[[int], None] | None = None) -> list[R]:
    """Flush and publish the files ``chosen`` from a cut (path, mark), all or none, over ``comm``'s ranks.

    Collective over ``comm`` (None: this process alone). ``done`` is called
    with each file's plan and :class:`~mpiburst.flush.writes.Tally` once
    every file of this rank is marked clean; returns its results for the
    files this rank flushed.
    A file another flush already put on the BFS past its mark is left out.

    Raises
    ------
    FlushError
        On every rank, if any file failed (see the module docstring for what
        is then published).
    """
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    nthreads = threads()
    umask = current_umask()
    dirs = {os.path.dirname(path): mark.umask if mark.umask is not None else umask for path, mark in chosen}
    try:
        return _attempt(tier, list(chosen[rank::size]), len(chosen), dirs, comm, nthreads, parallel=True,
                        done=done, progress=progress)
    except FlushError as exc:
        busy = isinstance(exc, Busy)
        if not all(comm.allgather(busy)) if comm is not None else not busy:
            raise   # a real failure somewhere: every rank raises (each its own error)
    # another flush holds a file: rank 0 alone, in path order, waiting for each file as a sync does
    results = on_root(comm, lambda: _attempt(tier, list(chosen), len(chosen), dirs, None, 1, parallel=False, done=done,
                                             progress=progress))
    return results if rank == 0 else []


def _attempt(tier: Tier, files: list[tuple[str, FileMeta]], total: int, dirs: dict[str, int],
             comm: MPI.Comm | None, nthreads: int, parallel: bool, done: Callable[[Plan, writes.Tally], R],
             progress: Callable[[int], None] | None) -> list[R]:
    """Run the five steps over this rank's ``files`` (of ``total``); ``dirs``: the commit's directories → umask.

    ``parallel``: take no lock or lease another flush holds (raise
    :class:`Busy` instead, on every rank that met one) and find the
    leftovers beside the files with one listing per directory; otherwise wait
    for each lock and lease and look the leftovers up file by file, as a sync does.
    """
    store = tier.store
    plans: list[Plan] = []   # every file prepared (appended from the threads): undone on a failure
    keeper = _LeaseKeeper(store)
    published = False
    pool = ThreadPoolExecutor(nthreads, thread_name_prefix="mpiburst-commit") if nthreads > 1 else None
    written = _Written(progress)
    locks: list[snapshot.BfsLock] = []   # rank 0's, for every rank
    stages: list[newdirs.Stage] = []     # rank 0's: the new directories it staged and publishes

    def lay_out() -> dict[str, tuple[str, bool]]:
        done = newdirs.layout(dirs, tier.bfs_root, secrets.token_hex(8), wait=0 if parallel else None,
                              stage=parallel)
        locks.extend(done.locks)
        stages.extend(done.stages)
        return done.staged

    taken: dict[str, tuple[str, FileMeta]] = {}   # path -> lease token and snapshot, taken at one go (parallel)
    listed: dict[str, list[Entry]] = {}   # a small file's index up to its mark, listed at one go (parallel)

    def take_leases() -> None:
        """Take every file's lease and begin its snapshot at one go; :class:`Busy` if another flush holds one."""
        paths = [path for path, _ in files]
        now = time.monotonic()
        got = store.lease_and_begin(paths, snapshot.LEASE_SECONDS)
        taken.update((path, one) for path, one in zip(paths, got) if one is not None)
        if len(taken) < len(paths):   # given back below, with the other ranks'
            held = next(path for path, one in zip(paths, got) if one is None)
            raise Busy(f"another flush of {held} holds its lease.")
        for path, (token, _) in taken.items():
            keeper.hold(path, token, now)   # renewed from now on: preparing thousands of files outlasts a lease
        small = [(path, 0, mark.size, mark.seq) for path, mark in files if 0 < mark.size <= writes.WRITE_SIZE]
        listed.update(zip([path for path, *_ in small], store.index_many(small)))   # written whole: one batch

    try:
        staged = on_root(comm, lay_out)   # every rank: where each new directory's files are written
        beside = _leftovers([path for path, _ in files if os.path.dirname(path) not in staged]) if parallel else {}
        listings = {d: snapshot.Listing.of(d) if d not in staged else snapshot.Listing(frozenset(), staged[d][1])
                    for d in {os.path.dirname(p) for p, _ in files}} if parallel else {}

        def make(item: tuple[str, FileMeta]) -> tuple[Plan, writes.Tally] | None:
            """Prepare, write and fsync one file's new version, opened once (no file waits for the others)."""
            path, mark = item
            if not parallel:
                plan = snapshot.prepare(store, path, tier.align, cut=mark, locked=True)
                if plan is not None:
                    keeper.hold(path, plan.token, time.monotonic())
            else:
                directory = os.path.dirname(path)
                plan = snapshot.prepare(store, path, tier.align, cut=mark, wait=0, beside=beside.get(path, []),
                                        locked=True, listing=listings.get(directory),
                                        stage_dir=staged[directory][0] if directory in staged else None,
                                        taken=taken[path])
                if plan is None:   # its lease is given back
                    keeper.forget(path)
            if plan is None:
                return None
            plans.append(plan)
            tally = writes.Tally(written.file())
            writes.write_run(store, plan, [locality.stripe_range(plan, 0, 1)], tally, 1, sync=False,
                             listed=listed.get(path) if (plan.size, plan.upto) == (mark.size, mark.seq) else None)
            writes.seal(plan)
            return plan, tally

        if parallel:
            together(comm, take_leases)
        made = together(comm, lambda: [m for m in _all(_each(pool, make, files)) if m is not None])
        tallies = {id(plan): tally for plan, tally in made}
        together(comm, keeper.check)
        everyone = comm.allgather(plans) if comm is not None else [plans]

        def journal_it() -> str:
            newdirs.fsync_staged(stages, [where for where, _ in staged.values()])   # their entries, then the journal
            return write_journal(tier.bfs_root, [p for share in everyone for p in share],
                                 [(one.root, one.top) for one in stages])

        journal = on_root(comm, journal_it)
        published = True
        together(comm, lambda: _publish(pool, plans, stages))
        on_root(comm, lambda: os.unlink(journal))
        keeper.stop()

        def settle() -> list[R]:
            marked = store.mark_clean_many([(plan.target, plan.token, plan.upto, plan.trunc) for plan in plans])
            if not all(marked):
                raise LeaseLost()
            return [done(plan, tallies[id(plan)]) for plan in plans]

        results = together(comm, settle)
    except Exception as exc:
        keeper.stop()
        planned = {plan.target for plan in plans}
        for path, (token, _) in taken.items():   # taken, then no plan made (another rank failed first)
            if path not in planned:
                FlushLease(store, path, token, snapshot.LEASE_SECONDS).release()
        for plan in plans:
            if published:   # the journal completes the renames at the next sync or commit
                FlushLease(store, plan.target, plan.token, snapshot.LEASE_SECONDS).release()
                snapshot.release_lock(plan.token)
            else:
                writes.abort(store, plan)
        if not published:
            for one in stages:   # every rank is done with its files in them (each step above is collective)
                newdirs.remove(one.root)
        if isinstance(exc, Busy) and not published:
            raise
        why = exc if isinstance(exc, MpiburstError) else cause(exc)
        raise FlushError(f"commit of {total} files failed: {str(why).rstrip('.')}; nothing of it was "
                         "published and the data stays dirty in the tier, fix the cause and commit again."
                         if not published else
                         f"commit of {total} files failed while publishing them: {cause(exc)}; the next "
                         "sync or commit completes it.") from None
    finally:
        if pool is not None:
            pool.shutdown()
        for lock in locks:   # every rank is done with its files (each step above is collective)
            lock.release()
    return results


def _leftovers(targets: Sequence[str]) -> dict[str, list[str]]:
    """Return, for each target, the paths beside it named ``.<name>.mpiburst-*``: one listing per directory."""
    wanted: dict[str, set[str]] = {}
    for target in targets:
        directory, name = os.path.split(target)
        wanted.setdefault(directory, set()).add(name)
    found: dict[str, list[str]] = {}
    for directory, names in wanted.items():
        try:
            entries = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if not entry.startswith(".") or _ASIDE not in entry:
                continue
            name = entry[1:entry.rindex(_ASIDE)]
            while name not in names and _ASIDE in name:   # a name holding the marker itself
                name = name[:name.rindex(_ASIDE)]
            if name in names:
                found.setdefault(os.path.join(directory, name), []).append(os.path.join(directory, entry))
    return found


def _each(pool: ThreadPoolExecutor | None, action: Callable[[T], R], items: Sequence[T]) -> list[R | BaseException]:
    """Run ``action`` on every item (in ``pool``'s threads, or in order); return each result or exception."""
    def one(item: T) -> R | BaseException:
        try:
            return action(item)
        except Exception as exc:   # every item runs: the caller undoes what the others did
            return exc

    if pool is None:
        return [one(item) for item in items]
    return list(pool.map(one, items))


def _first_error(results: Sequence[Any]) -> BaseException | None:
    """The error to raise of ``results``: one that is not :class:`Busy` first (a real failure is no reason to retry)."""
    errors = [r for r in results if isinstance(r, BaseException)]
    return next((e for e in errors if not isinstance(e, Busy)), errors[0] if errors else None)


def _all(results: Sequence[T | BaseException]) -> list[T]:
    """Return ``results``; raise the first error among them instead (see :func:`_first_error`), if any."""
    error = _first_error(results)
    if error is not None:
        raise error
    return [r for r in results if not isinstance(r, BaseException)]


def _publish(pool: ThreadPoolExecutor | None, plans: list[Plan], stages: Sequence[newdirs.Stage]) -> None:
    """Rename every new version into place and every staging directory to its name, then fsync each parent once."""
    def rename(plan: Plan) -> None:
        if plan.in_place:
            os.unlink(plan.work)
        elif not plan.staged:   # published with its directory
            os.rename(plan.work, plan.target)

    _all(_each(pool, rename, plans))
    for one in stages:
        newdirs.publish(one.root, one.top)
    parents = [os.path.dirname(p.target) for p in plans if not p.staged] + [os.path.dirname(s.top) for s in stages]
    _all(_each(pool, writes.fsync_dir, list(dict.fromkeys(parents))))


class _Written:
    """The bytes this process's commit threads wrote so far, over all its files, for a progress callback."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self._progress = progress
        self._bytes = 0
        self._lock = threading.Lock()

    def file(self) -> Callable[[int], None] | None:
        """Return the callback of one file's :class:`~mpiburst.flush.writes.Tally` (its running total)."""
        progress = self._progress
        if progress is None:
            return None
        last = 0

        def add(done: int) -> None:
            nonlocal last
            with self._lock:
                self._bytes += done - last
                last = done
                total = self._bytes
            progress(total)

        return add


class _LeaseKeeper:
    """Renews the leases of every file a commit holds, from a thread, until stopped.

    A commit of thousands of files holds thousands of leases: the renewals
    of a round go out at one go (:meth:`~mpiburst.store.Store.renew_many`: a
    round trip per 1,024 leases on a server, not one per lease), a round
    every eighth of a lease, so that a slow server (a loaded machine) still
    renews each lease well before it expires. A round renews only the
    leases taken or renewed over a quarter of a lease ago: renewing all of
    them every round made a commit's renewals grow with the square of its
    files (10,000 files: 5,000 renewals per rank every 3.75 s, for as long
    as the commit ran).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: dict[str, tuple[str, list[float]]] = {}   # path -> its lease's token, when last renewed
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mpiburst-lease-keeper")
        self._thread.start()

    def hold(self, path: str, token: str, since: float) -> None:
        """Renew the lease ``token`` of ``path``, taken at ``since`` (``time.monotonic``), from now on (thread-safe)."""
        with self._lock:
            self._held[path] = (token, [since])

    def forget(self, path: str) -> None:
        """Renew the lease of ``path`` no longer (it was given back; thread-safe)."""
        with self._lock:
            self._held.pop(path, None)

    def check(self) -> None:
        """Raise if a lease was lost meanwhile."""
        if self._lost is not None:
            raise LeaseLost()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(snapshot.LEASE_SECONDS / 8):
            due = time.monotonic() - snapshot.LEASE_SECONDS / 4
            with self._lock:
                late = [(path, token, renewed) for path, (token, renewed) in self._held.items() if renewed[0] < due]
            if not late:
                continue
            started = time.monotonic()
            try:
                renewed_ok = self._store.renew_many([(path, token) for path, token, _ in late], snapshot.LEASE_SECONDS)
            except Exception:  # noqa: BLE001 - the commit reports the cause when it next talks to the tier
                continue   # tried again next round
            for (path, _, renewed), ok in zip(late, renewed_ok):
                if not ok:
                    self._lost = path
                renewed[0] = started
