"""Sync and commit: run a flush's steps over the ranks of a communicator, or over the files of a cut.

:func:`sync` flushes one file: rank 0 prepares the snapshot
(:mod:`~mpiburst.flush.snapshot`), every rank takes its stripes
(:mod:`~mpiburst.flush.locality`) and writes them
(:mod:`~mpiburst.flush.writes`), and rank 0 publishes the new version and
marks it clean; a failure on any rank raises on every rank. :func:`commit`
flushes a consistent cut of many files and publishes them all or none, under
a journal (:mod:`~mpiburst.flush.journal`). :func:`enqueue` queues a request
for the automatic engine instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from .. import iostats
from ..collective import on_root
from ..errors import FlushError, MpiburstError, PathError
from ..paths import resolve
from ..progress import JobBytes
from ..store import FlushLease
from ..tier import Tier
from . import locality, many, snapshot, writes
from .failures import LEASE_LOST, cause, failed
from .journal import recover
from .snapshot import Plan

if TYPE_CHECKING:   # mpi4py is imported only by those who pass a communicator
    from mpi4py import MPI

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
        most :data:`~mpiburst.flush.writes.WRITE_SIZE` (only the file's last stripe may be short).
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


@overload
def sync(path: str | os.PathLike, *, tier: Tier | None = None, comm: MPI.Comm | None = None,
         block: Literal[True] = True, verify: bool = False, workers: int = 1,
         progress: Callable[[int], None] | None = None) -> FlushReport: ...


@overload
def sync(path: str | os.PathLike, *, tier: Tier | None = None, comm: MPI.Comm | None = None,
         block: bool, verify: bool = False, workers: int = 1,
         progress: Callable[[int], None] | None = None) -> FlushReport | None: ...


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
    tier.send_unsent(target)   # a new file this process opened and sent nothing of yet is in the tier
    if not block:
        enqueue(tier, "sync", target)
        return None
    group: MPI.Comm | _Solo = comm if comm is not None else _Solo()
    store = tier.store
    started = time.monotonic()

    def make_plan() -> tuple[Plan, bool]:
        try:
            recover(tier.bfs_root)   # a commit killed while renaming: finish it before touching its files
            plan = snapshot.prepare(store, target, tier.align)
            assert plan is not None      # without a cut there is always a plan
            return plan, progress is not None
        except (PathError, FlushError):
            raise
        except Exception as exc:   # a lost server, say: the data stays dirty, say so
            raise failed(target, cause(exc)) from None

    # rank 0 plans; every rank gets the plan (and whether rank 0 shows progress) or the error
    plan, root_progress = on_root(comm, make_plan)

    ranges, error = locality.share_out(store, plan, group)   # collective: every rank gets its stripes, or the same error
    job = None
    if group.Get_size() > 1 and (root_progress or progress is not None):   # count the whole job's bytes
        job = JobBytes(lambda n: store.shared_pointer(plan.target, progress_counter(plan), n) + n, progress)
    tally = writes.Tally(job.update if job is not None else progress, verify)
    if error is None:
        try:
            with FlushLease(store, plan.target, plan.token, snapshot.LEASE_SECONDS):  # a failure gives the lease back,
                writes.write_run(store, plan, ranges, tally, max(1, workers))  # so the other flushers stop soon
                if verify:
                    writes.verify_stripes(plan.work, tally.crcs)
                if job is not None:
                    job.close()
        except Exception as exc:  # every cause becomes one line; the data stays dirty
            error = cause(exc)
    outcomes = group.allgather((error, tally.bytes, dict(tally.sizes), tally.drained, job is not None and job.shared))

    def conclude() -> FlushReport:
        if any(o[4] for o in outcomes):   # every flusher is done: drop the progress counter
            with contextlib.suppress(MpiburstError):
                store.drop_shared_pointer(plan.target, progress_counter(plan))
        # The root cause first: the other flushers only saw the lease the failing one released.
        failures = sorted((e for e, *_ in outcomes if e), key=lambda e: e == LEASE_LOST)
        if failures:
            writes.abort(store, plan)
            raise failed(target, failures[0])
        try:
            checksum = writes.finish(store, plan, verify)
        except Exception as exc:
            writes.abort(store, plan)
            raise failed(target, cause(exc)) from None
        return _report(plan, checksum)

    result = on_root(comm, conclude)    # rank 0 publishes and marks clean; every rank gets the outcome
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
    iostats.record_flush(store, result, plan.align, group.Get_rank(), time.time() - result.seconds)
    return result


def progress_counter(plan: Plan) -> str:
    """Name the counter of a collective sync's bytes written (:class:`JobBytes`) among the file's atomic counters.

    The store's atomic counters per file and token are those of MPI shared
    file pointers (:meth:`Store.shared_pointer`); the flush lease's token
    keeps this one apart from every open's pointer and every other flush's.
    """
    return f"flush-progress:{plan.token}"


def _report(plan: Plan, checksum: str | None) -> FlushReport:
    """The report of a published flush, before its counts are added."""
    return FlushReport(path=plan.target, size=plan.size, checksum=checksum, upto=plan.upto)


def commit(paths: Iterable[str] | None = None, *, tier: Tier | None = None, include_pinned: bool = True,
           select: Callable[[str], bool] | None = None,
           log: Callable[[str], None] | None = None,
           progress: Callable[[int], None] | None = None, settled: bool = False,
           comm: MPI.Comm | None = None) -> list[FlushReport]:
    """Flush a consistent cut of the tier's files to the BFS, all or nothing.

    Every file's watermark is taken in one atomic step (:meth:`Store.cut
    <mpiburst.store.Store.cut>`), each dirty file is flushed exactly up to its
    mark (newer writes stay dirty), and the new versions are renamed into
    place only when all of them are written and fsync'd, under a journal
    (``.mpiburst-commit-<token>.json`` in the BFS root) that the next sync or
    commit completes if this one is killed while renaming (the files of a
    directory that does not exist yet are staged in a hidden directory and
    published by one rename of it: :mod:`mpiburst.flush.newdirs`). So if write B
    was issued after write A had completed (its file closed or synced), B on
    the BFS implies A on the BFS. The files are flushed many at once: each
    rank of ``comm`` takes a share, and flushes it in a pool of threads
    (:mod:`mpiburst.flush.many`).

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
        left out while later writes that depend on it are in. With ``comm``
        it is called on rank 0 only.
    log
        Called with one line per file committed (by this rank).
    progress
        Called with the bytes written to the BFS so far by this rank, over all its files.
    settled
        Publish only states the application made consistent (the engine, a
        writer making room, a commit on SIGUSR1, a stage-out after a failed
        job): a file that a handle still has open for writing is committed
        up to its settled mark (:meth:`mpiburst.store.FileMeta.settled_state`:
        its state when that writer opened it, or at its last ``Sync``); its
        later writes stay dirty. When one file's settled state is gone (a
        truncation clipped it before the BFS had it), nothing is committed:
        the commit waits for the next consistent point. False: every file
        as the cut has it (an explicit commit).
    comm
        Commit collectively over this communicator's ranks (every rank calls
        ``commit`` with the same arguments); default this process alone.

    Returns
    -------
    list of FlushReport
        One per file that was dirty in the cut, in path order (every file, on every rank).

    Raises
    ------
    FlushError
        If any file fails (on every rank): nothing of the commit is
        published, every file stays dirty (or, if the commit failed while
        renaming, the next sync or commit finishes publishing it).
    """
    tier = tier or Tier.current(comm)
    store = tier.store
    started, began = time.monotonic(), time.time()

    def choose() -> list[tuple[str, Any]]:
        try:
            recover(tier.bfs_root)
            cut = store.cut()
        except Exception as exc:
            raise FlushError(f"commit failed: {cause(exc)}; the data stays dirty in the tier, fix the cause and "
                             f"commit again.") from None
        wanted = cut if paths is None else {p: cut[p] for p in paths if p in cut}
        if settled:   # a file being written: only its last consistent state (docs/consistency.md)
            states = {p: m.settled_state() for p, m in wanted.items()
                      if (include_pinned or not m.pinned) and (select is None or select(p))}
            if any(state is None for state in states.values()):
                return []   # one file's last consistent state is gone from the tier: a cut without it could
                #             hold a later write of another file without an earlier one of that file; wait
            wanted = {p: state for p, state in states.items() if state is not None}
        return [(p, wanted[p]) for p in sorted(wanted)
                if wanted[p].dirty and (include_pinned or not wanted[p].pinned) and (select is None or select(p))]

    def done(plan: Plan, tally: writes.Tally) -> FlushReport:
        report = _report(plan, None)
        report.bytes, report.writes, report.drained = tally.bytes, sum(tally.sizes.values()), tally.drained
        report.write_sizes = dict(sorted(tally.sizes.items()))
        report.seconds = time.monotonic() - started   # each file: the whole commit's time
        if log is not None:
            log(f"committed {report.path}: {report.bytes} bytes in {report.writes} writes")
        return report

    mine = many.flush_cut(tier, on_root(comm, choose), comm, done, progress)
    iostats.record_flushes(store, mine, tier.align, began)   # this rank's files, one store call
    everyone = comm.allgather(mine) if comm is not None else [mine]
    return sorted((r for share in everyone for r in share), key=lambda r: r.path)


def enqueue(tier: Tier, op: str, path: str, **fields: Any) -> None:
    """Queue a request (``op`` = ``"sync"`` or ``"prestage"``) in the tier for the engine."""
    tier.store.enqueue(json.dumps(dict(op=op, path=path, time=time.time(), **fields)).encode())
