"""Fault tests of docs/reliability.md that need real MPI ranks (``mpiexec -n 2`` and ``-n 4``).

Each test names the promise it checks; see docs/reliability.md for the list.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from mpiburst import residency
from mpiburst.errors import MpiburstError, TierFullError
from mpiburst.file import File
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(300)]

WRONLY = MPI.MODE_WRONLY | MPI.MODE_CREATE
MIB = 1 << 20


def _tier(mpi_tmp_path, server_binary, capacity: str) -> Tier:
    comm = MPI.COMM_WORLD
    bfs = mpi_tmp_path / "bfs"
    if comm.Get_rank() == 0:
        bfs.mkdir()
    comm.Barrier()
    return Tier.start(comm, id=f"rel{os.getppid()}", dir=str(mpi_tmp_path), bfs_root=str(bfs),
                      capacity=capacity, server=server_binary)


def _block(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, MIB, dtype=np.uint8).tobytes()


def test_full_tier_rounds_never_report_full_while_synced_data_can_be_freed(mpi_tmp_path, server_binary):
    """Promise: TierFullError only when nothing can be flushed or freed (#13 item 6).

    A 64 MiB tier, three rounds of 96 MiB written by all ranks together in
    1 MiB writes, each round closed and synced: the earlier rounds' synced
    data can always be freed, so no rank may see TierFullError, and every
    byte reaches the BFS.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    total = 96
    with _tier(mpi_tmp_path, server_binary, "64M") as tier:
        for r in range(3):
            info = MPI.Info.Create()
            info.Set("mpiburst_wr_buffer", "1M")
            f = File.Open(comm, f"burst://round{r}.dat", WRONLY, info)
            info.Free()
            try:
                for i in range(rank, total, size):
                    f.Write_at_all(i * MIB, _block(1000 * r + i))
                f.Close()
            except TierFullError as exc:
                pytest.fail(f"round {r}, rank {rank}: false TierFullError: {exc}")
            report = mpiburst.sync(f"burst://round{r}.dat", tier=tier, comm=comm)
            assert report.size == total * MIB
        if rank == 0:
            for r in range(3):
                with open(os.path.join(tier.bfs_root, f"round{r}.dat"), "rb") as fh:
                    for i in range(total):
                        assert fh.read(MIB) == _block(1000 * r + i), f"round {r} block {i} differs on the BFS"
        comm.Barrier()


def test_a_really_full_tier_is_reported_on_every_rank(mpi_tmp_path, server_binary):
    """Promise: a full tier with nothing to free fails a collective on every rank, no rank waits.

    One pinned file fills a 16 MiB tier; the collective writes of every rank
    then fail on every rank with TierFullError (or the collective's error),
    within the test's timeout.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with _tier(mpi_tmp_path, server_binary, "16M") as tier:
        info = MPI.Info.Create()
        info.Set("mpiburst_wr_buffer", "1M")
        f = File.Open(comm, "burst://pinned.dat", WRONLY, info)
        info.Free()
        if rank == 0:
            mpiburst.pin("burst://pinned.dat", tier=tier)
        comm.Barrier()
        failed = None
        try:
            for i in range(rank, 64, size):
                f.Write_at_all(i * MIB, _block(i) if rank == 0 else b"x" * 16)
            f.Sync()
        except MpiburstError as exc:
            failed = exc
        assert failed is not None, "a tier full of pinned data accepted 64 MiB"
        errors = comm.allgather(type(failed).__name__)
        assert "TierFullError" in errors
        f._tf = None  # the handle is unusable after the failure; leave without a collective Close
        comm.Barrier()


def test_an_offset_past_the_limit_is_refused_on_every_rank(mpi_tmp_path, server_binary):
    """Promise: a collective write past the exact-offset limit raises on every rank, none waits (#13 item 4)."""
    from mpiburst.writeback import MAX_OFFSET

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    with _tier(mpi_tmp_path, server_binary, "64M"):
        f = File.Open(comm, "burst://far.dat", WRONLY)
        offset = 2**62 if rank == comm.Get_size() - 1 else rank * 16
        with pytest.raises(MpiburstError) as exc:
            f.Write_at_all(offset, b"HELLO")
        if rank == comm.Get_size() - 1:
            assert type(exc.value).__name__ == "OffsetError" and str(MAX_OFFSET) in str(exc.value)
        with pytest.raises(MpiburstError):
            f.Set_size(2**63 - 1)                  # the same argument on every rank: all refuse at once
        f.Close()
        comm.Barrier()


@pytest.mark.timeout(90)
def test_open_after_a_nodes_server_died_raises_on_every_rank(mpi_tmp_path, server_binary, monkeypatch):
    """Promise: a collective Open on a multi-node tier whose last node's server is dead raises on every rank.

    Node 0 (every file's record) is up, so rank 0 registers the file; the
    ranks of the dead node fail connecting to their own server. Before the
    fix they raised alone and the other ranks waited forever in the next
    collective (#13 item 7 on a cluster tier).
    """
    import signal

    from mpiburst import nodes, server
    from mpiburst.testing.store import wait_for

    if not os.environ.get(nodes.RANKS_PER_NODE):
        monkeypatch.setenv(nodes.RANKS_PER_NODE, "1")      # every rank a node: a real cluster at -n 2
    comm = MPI.COMM_WORLD
    tier = _tier(mpi_tmp_path, server_binary, "64M")
    try:
        victim = tier.conf.nodes[-1]["pid"]
        assert len(tier.conf.nodes) > 1
        if comm.Get_rank() == 0:
            os.kill(victim, signal.SIGKILL)
            assert wait_for(lambda: not server.pid_alive(victim, server_binary), timeout=30)
        comm.Barrier()
        with pytest.raises(MpiburstError, match=f"node {len(tier.conf.nodes) - 1}"):
            f = File.Open(comm, "burst://after.dat", WRONLY)
            f.Write_at_all(comm.Get_rank() * MIB, b"x" * MIB)
            f.Close()
        comm.Barrier()
    finally:
        if comm.Get_rank() == 0:
            tier.stop()
        else:
            tier.disconnect()


@pytest.mark.timeout(90)
def test_ordered_write_after_the_server_died_raises_on_every_rank(mpi_tmp_path, server_binary):
    """Promise: ``Write_ordered`` whose shared-pointer step fails on rank 0 raises on every rank, none waits.

    Rank 0 advances the shared pointer for all; before the fix its error left
    it in a different collective than the other ranks (waiting for its
    broadcast).
    """
    import signal

    from mpiburst import server
    from mpiburst.testing.store import wait_for

    comm = MPI.COMM_WORLD
    tier = _tier(mpi_tmp_path, server_binary, "64M")
    try:
        f = File.Open(comm, "burst://ordered.dat", WRONLY)
        f.Write_ordered(b"a" * 16)
        pid = tier.conf.pid
        if comm.Get_rank() == 0:
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not server.pid_alive(pid, server_binary), timeout=30)
        comm.Barrier()
        with pytest.raises(MpiburstError):
            f.Write_ordered(b"b" * 16)
        f._tf = None          # the handle is unusable after the failure; leave without a collective Close
        comm.Barrier()
    finally:
        if comm.Get_rank() == 0:
            tier.stop()
        else:
            tier.disconnect()


def test_a_file_being_written_is_published_only_as_its_ranks_synced_it(mpi_tmp_path, server_binary):
    """Promise: the engine's sync publishes an open file only at its writers' last ``Sync`` (#29 item 1).

    Every rank writes its block A and calls ``Sync``, then writes block B
    (pushed to the tier: larger than the write-back buffer) without one: the
    automatic sync publishes the A blocks only, byte for byte; after
    ``Close`` the B blocks. Before the fix it published whatever the tier
    held, A of some ranks and B of others.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with _tier(mpi_tmp_path, server_binary, "64M") as tier:
        info = MPI.Info.Create()
        info.Set("mpiburst_wr_buffer", "64K")
        f = File.Open(comm, "burst://synced.dat", WRONLY, info)
        info.Free()
        path = os.path.join(tier.bfs_root, "synced.dat")
        f.Write_at(rank * MIB, _block(rank))
        f.Sync()
        f.Write_at(rank * MIB, _block(100 + rank))
        comm.Barrier()
        if rank == 0:
            assert tier.store.meta(path).writers == 1          # one handle for all the ranks
            residency.auto_sync(tier)
            with open(path, "rb") as fh:
                assert fh.read() == b"".join(_block(r) for r in range(size))
        comm.Barrier()
        f.Close()
        if rank == 0:
            assert tier.store.meta(path).writers == 0
            residency.auto_sync(tier)
            with open(path, "rb") as fh:
                assert fh.read() == b"".join(_block(100 + r) for r in range(size))
        comm.Barrier()
