"""The checkpoint loop: the whole job's time, what a user of a burst buffer waits for.

A job of ``K`` steps, each a fixed amount of work followed by a checkpoint:
every rank writes ``--size`` bytes in transfer-sized records into a new
shared file, in the ``strided`` layout (the records of the ranks interleave,
as a domain-decomposed array does in a shared file). Four ways:

* ``compute``: the work alone, no checkpoint (the floor of the job's time);
* ``mpiio_ckpt``: each checkpoint written directly with ``mpi4py.MPI.File``
  (``Open``, ``Write_at`` per record, ``Sync``, ``Close``) before the next step;
* ``mpiio_ckpt_1inN``: the same, but only checkpoints ``k % N == 0`` are
  written (``N = --flush-every``): what direct MPI-IO costs when it keeps
  as few checkpoints as the tier flushes;
* ``mpiburst_ckpt``: each checkpoint saved through
  :class:`mpiburst.Checkpoints` (``keep=2``, ``flush_every=N``): absorbed by
  ``mpiburst.File`` (``Open``, ``Write_at`` per record, ``Sync``, ``Close``)
  in a ``save`` block; one in ``N`` flushed by rank 0's background thread
  while the ranks work; the job ends with ``close()``, which flushes the
  newest if it was not and waits until every flush is durable. That wait is
  part of the job's time.

Two limits, measured in the same run on the same server and BFS, bound what
any burst buffer over this tier could reach (the floor of ``mpiburst_ckpt``):

* ``tier_ingest``: every checkpoint's records ``SET`` into the tier's server
  by plain redis-py, pipelined, one key per record, all kept until the end:
  the server's own ingest of the bytes mpiburst absorbs, with no file, index
  or bookkeeping;
* ``bfs_write``: one checkpoint written to the BFS at its raw speed (each
  rank its contiguous domain of one file, 8 MiB ``pwrite`` blocks,
  ``fdatasync``): the least the job waits at its end for its last
  checkpoint to be durable.

Two kinds of work (``--compute``): ``numpy``, the same number of
iterations of a small 1-D stencil (single threaded numpy, no BLAS threads)
in every method, calibrated once per run to take about ``--work`` seconds
per step with every rank busy; and ``idle``, where every rank waits
``--work`` seconds on a timer, as ranks do while a GPU or another machine
computes: the CPU is free for the background flush.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import baselines
from .baselines import agree, remove_output
from .burst import absorb_records
from .patterns import Layout, rank_data, records, verify_file
from .timing import collective_time

#: Elements of the stencil's array (float64: 2 MiB).
STENCIL_POINTS = 1 << 18
#: The kinds of work between checkpoints: numpy on every rank, or ranks waiting on a timer (CPU idle).
COMPUTE_MODES = ("numpy", "idle")


@dataclass(frozen=True)
class Loop:
    """One checkpoint loop: ``steps`` checkpoints of ``layout``, one step of work before each.

    ``compute`` is ``"numpy"`` (``iterations`` stencil sweeps) or ``"idle"``
    (a ``seconds`` wait); one in ``flush_every`` checkpoints is flushed.
    """

    layout: Layout
    steps: int
    iterations: int
    flush_every: int = 4
    compute: str = "numpy"
    seconds: float = 0.25

    def name(self, method: str, step: int) -> str:
        """Return the file name of checkpoint ``step`` of ``method``."""
        return f"ckpt-{self.layout.transfer}-{method}-{step}.dat"

    def work(self) -> Callable[[], None]:
        """Return one step of this loop's work."""
        if self.compute == "idle":
            return lambda: time.sleep(self.seconds)
        work = Work()
        return lambda: work.run(self.iterations)


def checkpoint_layout(transfer: int, size: int, nranks: int, rank: int) -> Layout:
    """Return the layout of one checkpoint: ``size`` bytes per rank, strided records of ``transfer`` bytes."""
    return Layout("strided", transfer, size, nranks, rank)


def _stencil(u: np.ndarray, tmp: np.ndarray, iterations: int) -> None:
    """Run ``iterations`` sweeps of a 3-point average over ``u`` in place."""
    for _ in range(iterations):
        np.add(u[:-2], u[2:], out=tmp)
        np.multiply(tmp, 0.5, out=u[1:-1])


class Work:
    """The fixed amount of numpy work of one step, on this rank's own array."""

    def __init__(self) -> None:
        self.u = np.random.default_rng(0).random(STENCIL_POINTS)
        self.tmp = np.empty(STENCIL_POINTS - 2)

    def run(self, iterations: int) -> None:
        """Do ``iterations`` sweeps."""
        _stencil(self.u, self.tmp, iterations)


def calibrate(comm: Any, seconds: float) -> int:
    """Return the sweeps that take about ``seconds`` with every rank working at once (the same on every rank)."""
    work = Work()
    n = 16
    while True:
        took, _ = collective_time(comm, lambda: work.run(n))  # noqa: B023 - called at once
        if took >= 0.05 or n >= 1 << 24:
            break
        n *= 4
    return max(1, round(n * seconds / took))


def compute(comm: Any, loop: Loop) -> float:
    """Return the seconds of the work alone: ``steps`` times the step's work, no checkpoint."""
    work = loop.work()

    def job() -> None:
        for _ in range(loop.steps):
            work()

    seconds, _ = collective_time(comm, job)
    return seconds


def direct(comm: Any, loop: Loop, scratch: str, recs: Sequence[tuple[int, np.ndarray]], check: bool,
           every: int = 1) -> tuple[float, bool]:
    """Return the seconds of the job writing checkpoints ``k % every == 0`` (k from 1) with direct MPI-IO,
    and whether every file is right."""
    from mpi4py import MPI

    paths = {k: os.path.join(scratch, loop.name(f"mpiio{every}", k)) for k in range(1, loop.steps + 1)
             if k % every == 0}
    work = loop.work()

    def job() -> None:
        for k in range(1, loop.steps + 1):
            work()
            if k not in paths:
                continue
            f = MPI.File.Open(comm, paths[k], MPI.MODE_WRONLY | MPI.MODE_CREATE)
            for offset, buf in recs:
                f.Write_at(offset, buf)
            f.Sync()
            f.Close()

    seconds, _ = collective_time(comm, job)
    ok = agree(comm, all(verify_file(loop.layout, p) for p in paths.values())) if check else True
    for path in paths.values():
        remove_output(comm, loop.layout, path)
    return seconds, ok


def through_mpiburst(comm: Any, tier: Any, loop: Loop, recs: Sequence[tuple[int, np.ndarray]],
                     check: bool, name: str) -> tuple[float, bool]:
    """Return the seconds of the job checkpointing through :class:`mpiburst.Checkpoints` until every flushed
    checkpoint is durable, and whether every flushed file is right."""
    from ..checkpoint import Checkpoints

    def job() -> Checkpoints:
        ck = Checkpoints(comm, name, keep=2, flush_every=loop.flush_every, tier=tier)
        work = loop.work()
        for k in range(1, loop.steps + 1):
            work()
            with ck.save(k) as c:
                absorb_records(comm, c.path("ckpt.dat"), recs)
        ck.close()          # the newest flushed if it was not; every flush durable
        return ck

    seconds, ck = collective_time(comm, job)
    flushed = [e for e in ck.entries() if e.on_bfs]
    ok = True
    if check:
        ok = agree(comm, bool(flushed) and all(
            verify_file(loop.layout, os.path.join(ck.catalog.step_dir(e.step), "ckpt.dat")) for e in flushed))
    for e in ck.entries():
        ck.drop(e.step, bfs=True)
    return seconds, ok


def tier_ingest(comm: Any, tier: Any, client: Any, loop: Loop, recs: Sequence[tuple[int, np.ndarray]]) -> float:
    """Return the seconds for every rank to ``SET`` the records of all ``steps`` checkpoints with plain redis-py.

    Pipelined, one key per record, every checkpoint kept until the end (as
    the tier holds them while they are absorbed); the keys are removed
    afterwards, untimed.
    """
    values = [bytes(buf) for _, buf in recs] * loop.steps   # a plain client sends bytes; built before timing
    keys = baselines.raw_keys(tier, "bench-ckpt-raw", comm.rank, len(values))
    seconds = baselines.tier_ingest(comm, client, keys, values)
    baselines.tier_clear(client, keys)
    return seconds


def run_config(comm: Any, tier: Any, client: Any, loop: Loop, repeat: int, scratch: str) -> dict[str, Any]:
    """Measure the four ways and the two limits ``repeat`` times, interleaved; return the raw dict :mod:`.report`
    expects. ``client``: a plain redis-py client of this rank's server (the ingest limit)."""
    data = rank_data(loop.layout)
    recs = records(loop.layout, data)
    keys = ("compute", "mpiio_ckpt", "mpiio_ckpt_1inN", "mpiburst_ckpt", "tier_ingest", "bfs_write")
    seconds: dict[str, list[float]] = {k: [] for k in keys}
    verified = dict.fromkeys(keys, True)
    direct_dir = os.path.join(scratch, "direct")
    raw_file = os.path.join(scratch, "raw", "ckpt.dat")
    for i in range(repeat):
        check = i == 0
        seconds["compute"].append(compute(comm, loop))
        seconds["tier_ingest"].append(tier_ingest(comm, tier, client, loop, recs))
        s, ok = baselines.bfs_shared_write(comm, raw_file, data, check)
        seconds["bfs_write"].append(s)
        verified["bfs_write"] = verified["bfs_write"] and ok
        for key, every in (("mpiio_ckpt", 1), ("mpiio_ckpt_1inN", loop.flush_every)):
            s, ok = direct(comm, loop, direct_dir, recs, check, every)
            seconds[key].append(s)
            verified[key] = verified[key] and ok
        s, ok = through_mpiburst(comm, tier, loop, recs, check,
                                 f"bench/ckpt-{loop.compute}-{loop.layout.transfer}-{i}")
        seconds["mpiburst_ckpt"].append(s)
        verified["mpiburst_ckpt"] = verified["mpiburst_ckpt"] and ok
    return {
        "pattern": "ckpt",
        "compute": loop.compute,
        "flush_every": loop.flush_every,
        "transfer": loop.layout.transfer,
        "ranks": loop.layout.nranks,
        "steps": loop.steps,
        "work_iterations": loop.iterations if loop.compute == "numpy" else 0,
        "work_seconds": loop.seconds,
        "bytes_per_rank": loop.layout.rank_bytes * loop.steps,
        "total_bytes": loop.layout.total_bytes * loop.steps,
        "seconds": seconds,
        "verified": verified,
    }
