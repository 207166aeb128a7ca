"""The mpiburst measurement: absorb a pattern through the tier, then flush it to the BFS.

One sample runs the same sequence as the direct MPI-IO peer, through
``mpiburst.File`` (Open, ``Write_at`` per record, Sync, Close: the
application-visible write time), then ``mpiburst.sync`` (the flush to durable
data on the BFS). It also records what the flush did to the BFS (bytes, number
and sizes of write calls, from the :class:`FlushReport`), the client's peak
memory growth during the write phase and the server's memory growth per
payload byte, and verifies the flushed file byte for byte.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .baselines import agree
from .patterns import Layout, verify_file
from .timing import PeakRSS, collective_time

#: Directory under the tier's BFS root (``burst://bench/...``) holding the benchmark's files.
URL_DIR = "bench"


@dataclass
class BurstSample:
    """One mpiburst run of one configuration.

    ``write`` and ``flush`` are seconds of the slowest rank; ``client_peak``
    the largest resident-memory growth of any rank during the write phase;
    ``server_bytes`` the server's ``used_memory`` growth while the file was
    absorbed; ``write_sizes`` maps a BFS write size to how many flush writes had it.
    """

    write: float
    flush: float
    flush_bytes: int
    flush_writes: int
    write_sizes: dict[int, int] = field(default_factory=dict)
    client_peak: int = 0
    server_bytes: int = 0
    ok: bool = True


def start_tier(comm: Any, bfs_root: str, capacity: str, rundir: str, server: str | None = None) -> Any:
    """Start the benchmark's tier (collective: rank 0 starts the server, one channel per rank).

    ``server`` is a server binary to use instead of the one found by default.
    """
    import mpiburst

    return mpiburst.Tier.start(comm, channels=comm.size, id="bench", bfs_root=bfs_root, capacity=capacity,
                               dir=rundir, server=server)


def _histogram(write_sizes: Any) -> Counter:
    """Return a FlushReport's ``write_sizes`` (a list of sizes or a size->count mapping) as a Counter."""
    if isinstance(write_sizes, dict):
        return Counter({int(k): int(v) for k, v in write_sizes.items()})
    return Counter(int(s) for s in write_sizes)


def _used_memory(admin: Any, tier: Any) -> int:
    """Return the server's ``used_memory`` in bytes (the sum over the nodes of a multi-node run)."""
    if tier.conf.nodes:
        return int(tier.store.memory()[0])
    return int(admin.info("memory")["used_memory"])


def absorb_records(fcomm: Any, url: str, recs: Sequence[tuple[int, np.ndarray]]) -> None:
    """Write every record through mpiburst the way the MPI-IO peer does: Open, Write_at each, Sync, Close."""
    from mpi4py import MPI

    import mpiburst

    f = mpiburst.File.Open(fcomm, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    for offset, buf in recs:
        f.Write_at(offset, buf)
    f.Sync()
    f.Close()


def absorb_unrecorded(comm: Any, layout: Layout, recs: Sequence[tuple[int, np.ndarray]], stem: str) -> float:
    """Return the seconds (slowest rank) of one absorb like :func:`measure`'s, with I/O recording off.

    The same code path, under the same memory sampler, with
    ``MPIBURST_IOSTATS=0`` while the file is open: the pair with
    :func:`measure`'s absorb gives recording's cost (:mod:`mpiburst.iostats`).
    """
    from mpi4py import MPI

    import mpiburst

    url = f"burst://{URL_DIR}/{layout.file_name(stem + '-norec')}"
    fcomm = comm if layout.shared else MPI.COMM_SELF
    before = os.environ.get("MPIBURST_IOSTATS")
    os.environ["MPIBURST_IOSTATS"] = "0"
    try:
        with PeakRSS():
            seconds, _ = collective_time(comm, lambda: absorb_records(fcomm, url, recs))
    finally:
        if before is None:
            del os.environ["MPIBURST_IOSTATS"]
        else:
            os.environ["MPIBURST_IOSTATS"] = before
    comm.Barrier()
    if not layout.shared or comm.rank == 0:
        mpiburst.File.Delete(url)
    comm.Barrier()
    return seconds


def measure(
    comm: Any,
    tier: Any,
    admin: Any,
    layout: Layout,
    recs: Sequence[tuple[int, np.ndarray]],
    stem: str,
    check: bool,
) -> BurstSample:
    """Run one mpiburst sample of ``layout`` and return its figures (collective over ``comm``).

    Parameters
    ----------
    comm
        All benchmark ranks.
    tier
        The running :class:`mpiburst.Tier`.
    admin
        Rank 0's admin connection to the server (for ``INFO memory``); None elsewhere.
    layout, recs
        This rank's records and the bytes to write.
    stem
        Name of the file under ``burst://bench/`` (per rank suffix added for nn).
    check
        Verify the flushed BFS file against the expected bytes.
    """
    from mpi4py import MPI

    import mpiburst

    name = f"{URL_DIR}/{layout.file_name(stem)}"
    url = f"burst://{name}"
    fcomm = comm if layout.shared else MPI.COMM_SELF

    before = _used_memory(admin, tier) if admin is not None else 0
    with PeakRSS() as rss:
        write, _ = collective_time(comm, lambda: absorb_records(fcomm, url, recs))
    server_bytes = _used_memory(admin, tier) - before if admin is not None else 0
    flush, report = collective_time(comm, lambda: mpiburst.sync(url, comm=fcomm))

    # A collective sync reports the whole file's flush on every rank; nn files are flushed one per rank.
    mine = (report.bytes, report.writes, _histogram(report.write_sizes))
    if layout.shared:
        flush_bytes, flush_writes, sizes = mine
    else:
        parts = comm.allgather(mine)
        flush_bytes = sum(p[0] for p in parts)
        flush_writes = sum(p[1] for p in parts)
        sizes = sum((p[2] for p in parts), Counter())

    ok = agree(comm, verify_file(layout, os.path.join(tier.bfs_root, name))) if check else True
    if not layout.shared or comm.rank == 0:
        mpiburst.File.Delete(url)
    comm.Barrier()
    return BurstSample(
        write=write,
        flush=flush,
        flush_bytes=int(flush_bytes),
        flush_writes=int(flush_writes),
        write_sizes=dict(sorted(sizes.items())),
        client_peak=int(comm.allreduce(rss.peak, op=MPI.MAX)),
        server_bytes=int(server_bytes),
        ok=ok,
    )
