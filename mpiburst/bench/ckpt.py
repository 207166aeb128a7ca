"""The checkpoint loop: the whole job's time, what a user of a burst buffer waits for.

A job of ``K`` steps, each a fixed amount of numpy work followed by a
checkpoint: every rank writes ``--size`` bytes in transfer-sized records
into a new shared file, in the ``strided`` layout (the records of the ranks
interleave, as a domain-decomposed array does in a shared file). Three ways:

* ``compute``: the work alone, no checkpoint (the floor of the job's time);
* ``mpiio_ckpt``: each checkpoint written directly with ``mpi4py.MPI.File``
  (``Open``, ``Write_at`` per record, ``Sync``, ``Close``) before the next step;
* ``mpiburst_ckpt``: each checkpoint absorbed by ``mpiburst.File`` (``Open``,
  ``Write_at`` per record, ``Sync``, ``Close``), then queued for a background
  flush (``mpiburst.sync(url, block=False)``: the tier's engine writes it to
  the BFS while the ranks compute); after the last step the job waits until
  every checkpoint is durable on the BFS. That wait is part of the job's time.

The work is the same number of iterations of a small 1-D stencil (single
threaded numpy, no BLAS threads) in every method: it is calibrated once per
run to take about ``--work`` seconds per step with every rank busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..collective import on_root
from ..errors import MpiburstError
from .baselines import agree, remove_output
from .burst import URL_DIR, _absorb
from .patterns import Layout, rank_data, records, verify_file
from .timing import collective_time

#: Elements of the stencil's array (float64: 2 MiB).
STENCIL_POINTS = 1 << 18
#: Seconds the end of the mpiburst job may wait for the background flush before giving up.
DRAIN_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Loop:
    """One checkpoint loop: ``steps`` checkpoints of ``layout``, ``iterations`` of work before each."""

    layout: Layout
    steps: int
    iterations: int

    def name(self, method: str, step: int) -> str:
        """Return the file name of checkpoint ``step`` of ``method``."""
        return f"ckpt-{self.layout.transfer}-{method}-{step}.dat"


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
    """Return the seconds of the work alone: ``steps`` times the step's sweeps, no checkpoint."""
    work = Work()

    def job() -> None:
        for _ in range(loop.steps):
            work.run(loop.iterations)

    seconds, _ = collective_time(comm, job)
    return seconds


def direct(comm: Any, loop: Loop, scratch: str, recs: Sequence[tuple[int, np.ndarray]], check: bool) -> tuple[float, bool]:
    """Return the seconds of the job writing each checkpoint with direct MPI-IO, and whether every file is right."""
    from mpi4py import MPI

    paths = [os.path.join(scratch, loop.name("mpiio", k)) for k in range(loop.steps)]
    work = Work()

    def job() -> None:
        for path in paths:
            work.run(loop.iterations)
            f = MPI.File.Open(comm, path, MPI.MODE_WRONLY | MPI.MODE_CREATE)
            for offset, buf in recs:
                f.Write_at(offset, buf)
            f.Sync()
            f.Close()

    seconds, _ = collective_time(comm, job)
    ok = agree(comm, all(verify_file(loop.layout, p) for p in paths)) if check else True
    for path in paths:
        remove_output(comm, loop.layout, path)
    return seconds, ok


def _drain(tier: Any, urls: Sequence[str]) -> None:
    """Wait until the tier holds nothing dirty of any of ``urls`` (rank 0; raises if the engine does not get there)."""
    from .. import residency

    deadline = time.monotonic() + DRAIN_TIMEOUT
    for url in urls:
        if not residency.wait_clean(url, tier=tier, timeout=max(0.0, deadline - time.monotonic())):
            raise MpiburstError(f"the background flush of {url} did not finish within {DRAIN_TIMEOUT:.0f} s; "
                                f"see the engine's log in {tier.conf.dir}.")


def through_mpiburst(comm: Any, tier: Any, loop: Loop, recs: Sequence[tuple[int, np.ndarray]],
                     check: bool) -> tuple[float, bool]:
    """Return the seconds of the job checkpointing through mpiburst until every checkpoint is durable, and
    whether every flushed file is right."""
    import mpiburst

    urls = [f"burst://{URL_DIR}/{loop.name('mpiburst', k)}" for k in range(loop.steps)]
    work = Work()

    def job() -> None:
        for url in urls:
            work.run(loop.iterations)
            _absorb(comm, url, recs)
            if comm.rank == 0:
                mpiburst.sync(url, tier=tier, block=False)  # the engine flushes it while the ranks compute
        on_root(comm, lambda: _drain(tier, urls))   # rank 0 waits for the engine; its failure raises everywhere

    seconds, _ = collective_time(comm, job)
    ok = True
    if check:
        ok = agree(comm, all(verify_file(loop.layout, os.path.join(tier.bfs_root, URL_DIR, loop.name("mpiburst", k)))
                             for k in range(loop.steps)))
    on_root(comm, lambda: [mpiburst.File.Delete(url) for url in urls])
    return seconds, ok


def run_config(comm: Any, tier: Any, loop: Loop, repeat: int, scratch: str) -> dict[str, Any]:
    """Measure the three ways ``repeat`` times, interleaved; return the raw dict :mod:`.report` expects."""
    recs = records(loop.layout, rank_data(loop.layout))
    seconds: dict[str, list[float]] = {"compute": [], "mpiio_ckpt": [], "mpiburst_ckpt": []}
    verified = {"compute": True, "mpiio_ckpt": True, "mpiburst_ckpt": True}
    direct_dir = os.path.join(scratch, "direct")
    for i in range(repeat):
        check = i == 0
        seconds["compute"].append(compute(comm, loop))
        s, ok = direct(comm, loop, direct_dir, recs, check)
        seconds["mpiio_ckpt"].append(s)
        verified["mpiio_ckpt"] = verified["mpiio_ckpt"] and ok
        s, ok = through_mpiburst(comm, tier, loop, recs, check)
        seconds["mpiburst_ckpt"].append(s)
        verified["mpiburst_ckpt"] = verified["mpiburst_ckpt"] and ok
    return {
        "pattern": "ckpt",
        "transfer": loop.layout.transfer,
        "ranks": loop.layout.nranks,
        "steps": loop.steps,
        "work_iterations": loop.iterations,
        "bytes_per_rank": loop.layout.rank_bytes * loop.steps,
        "total_bytes": loop.layout.total_bytes * loop.steps,
        "seconds": seconds,
        "verified": verified,
    }
