"""A node's server lost on a run of three nodes, with and without a replica on a partner node (#23).

``tests/run.sh`` runs this file with ``-n 6`` and ``MPIBURST_RANKS_PER_NODE=2``
(three nodes of two ranks): the cluster then promotes a lost node's replica
by itself (a majority of primaries is left). With fewer ranks these tests
are skipped (a run of two nodes has no majority to promote a replica).

Every rank writes its own block of one shared file and closes it; then node
1's server is SIGKILLed (later node 2's, between a rank's pushed and
confirmed writes, and node 0's in the middle of a collective sync; in
another run node 1's in the middle of a commit). With ``replicas=1`` every
byte is still read back through the tier on every rank, and a collective
sync or commit puts it on the BFS exactly; without replicas the same kill
loses node 1's data (:class:`NodeLostError` on every rank).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from conftest import started_tier

import mpiburst
from mpiburst import nodes
from mpiburst.errors import FlushError, NodeLostError
from mpiburst.flush import writes
from mpiburst.server.process import wait_gone
from mpiburst.store import file_id
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=6), pytest.mark.timeout(120)]

BLOCK = 256 << 10


def _pattern(rank: int) -> np.ndarray:
    """Rank ``rank``'s block: bytes no other rank writes."""
    return ((np.arange(BLOCK, dtype=np.uint32) * 7 + rank * 131) % 251).astype(np.uint8)


def _write_close_kill(comm, tier: Tier, path: str) -> None:  # noqa: ANN001
    """Every rank writes its block (in two writes) and closes the file; then node 1's server is SIGKILLed."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    f = mpiburst.File.Open(comm, path, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    block = _pattern(rank)
    f.Write_at(rank * BLOCK, block[:BLOCK // 2])
    f.Write_at(rank * BLOCK + BLOCK // 2, block[BLOCK // 2:])
    f.Close()
    comm.Barrier()
    if rank == 0:
        os.kill(tier.conf.nodes[1]["pid"], signal.SIGKILL)
    comm.Barrier()


def _read_all(comm, path: str) -> np.ndarray:  # noqa: ANN001
    """Read the whole file through the tier on this rank."""
    from mpi4py import MPI

    f = mpiburst.File.Open(comm, path, MPI.MODE_RDONLY)
    try:
        out = np.zeros(comm.Get_size() * BLOCK, dtype=np.uint8)
        f.Read_at(0, out)
    finally:
        f.Close()
    return out


@pytest.fixture
def three_nodes(monkeypatch) -> None:
    """Two ranks per node: six ranks are three nodes."""
    monkeypatch.setenv(nodes.RANKS_PER_NODE, os.environ.get(nodes.RANKS_PER_NODE) or "2")


@pytest.mark.slow
def test_nodes_killed_after_close_mid_write_and_mid_sync_lose_nothing_with_replicas(mpi_tmp_path: Path,
                                                                                   server_binary: str,
                                                                                   three_nodes: None):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bfs = mpi_tmp_path / "bfs"
    with started_tier(mpi_tmp_path, server_binary, comm, id="rep", capacity="64M", replicas=1) as tier:
        assert tier.conf.replicas == 1 and len(tier.conf.nodes) == size // 2
        # node k's replica lives on node k+1 (a ring): another server, started by that node's first rank
        assert all(n["replica"]["pid"] != m["pid"] for n in tier.conf.nodes for m in tier.conf.nodes)
        _write_close_kill(comm, tier, "burst://kept.dat")
        expected = np.concatenate([_pattern(r) for r in range(size)])
        assert np.array_equal(_read_all(comm, "burst://kept.dat"), expected)
        assert 1 in tier.store.failed_over
        mpiburst.sync("burst://kept.dat", comm=comm)
        comm.Barrier()
        assert np.array_equal(np.fromfile(bfs / "kept.dat", dtype=np.uint8), expected)

        # then node 2's server, in the middle of the writes: each rank's first third synced; its second third pushed
        # but not confirmed, with node 2's replica held back (stopped, 24 MiB queued for it) so that node 2's ranks'
        # batches never reach it; node 2's server killed; its last third still in its write-back buffer. Sync sends
        # what node 2's replica lacks to it again once promoted (the cluster still has a majority); Close pushes the
        # last third there
        f = mpiburst.File.Open(comm, "burst://midway.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
        block = _pattern(rank + size)
        third = BLOCK // 3
        f.Write_at(rank * BLOCK, block[:third])
        f.Sync()
        comm.Barrier()
        node2 = tier.conf.nodes[2]
        if rank == 0:
            os.kill(node2["replica"]["pid"], signal.SIGSTOP)
            tier.store.clients[2].set(f"mpb:{{{tier.store.tags[2]}}}:filler", b"f" * (24 << 20))
        comm.Barrier()
        try:
            f.Write_at(rank * BLOCK + third, block[third:2 * third])
            f.Get_size()   # pushes this rank's writes to its node's server, without waiting for the replica
            pushed = list(tier.store.pushed)   # the batches not yet confirmed, kept to be sent again
            assert pushed and all(p.node == tier.store.local for p in pushed)
            comm.Barrier()
            if rank == 0:
                os.kill(node2["pid"], signal.SIGKILL)
                assert wait_gone(node2["pid"], server_binary, 10)
        finally:
            comm.Barrier()
            if rank == 0:
                os.kill(node2["replica"]["pid"], signal.SIGCONT)
        f.Sync()
        if tier.store.local == 2:   # the promoted replica never had them under their first numbers: sent again
            shard = tier.store.shards[2]
            assert 2 in tier.store.failed_over
            assert not any(shard.r.exists(shard.keys.file(file_id(p.path), f"b:{p.base}")) for p in pushed)
        f.Write_at(rank * BLOCK + 2 * third, block[2 * third:])
        f.Close()
        expected = np.concatenate([_pattern(r + size) for r in range(size)])
        assert np.array_equal(_read_all(comm, "burst://midway.dat"), expected)
        assert tier.store.failed_over == {1, 2}
        mpiburst.sync("burst://midway.dat", comm=comm)
        comm.Barrier()
        assert np.array_equal(np.fromfile(bfs / "midway.dat", dtype=np.uint8), expected)

        # then node 0's server (every file's record, the lease) in the middle of a collective sync: killed at rank 0's
        # first write to the BFS of any rank, so the rest of the flush (its lease, its clean mark, its log) runs on node 0's
        # promoted replica; it completes, or fails on every rank and a second sync completes it
        f = mpiburst.File.Open(comm, "burst://flushed.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
        f.Write_at(rank * BLOCK, _pattern(rank + 2 * size))
        f.Close()
        expected = np.concatenate([_pattern(r + 2 * size) for r in range(size)])
        with _killed_at_first_bfs_write(comm, tier.conf.nodes[0]["pid"]) as killed:
            _sync_or_again(comm, "burst://flushed.dat")
        assert killed == [True]   # inside the flush
        assert np.array_equal(np.fromfile(bfs / "flushed.dat", dtype=np.uint8), expected)
        assert np.array_equal(_read_all(comm, "burst://flushed.dat"), expected)
        assert 0 in tier.store.failed_over
        assert not tier.store.meta(str(bfs / "flushed.dat")).dirty   # marked clean on the promoted replica


@contextmanager
def _killed_at_first_bfs_write(comm, pid: int) -> Iterator[list[bool]]:  # noqa: ANN001
    """SIGKILL ``pid`` (a node's server) at the first write to the BFS of any rank inside the block.

    Yields a list that holds, once the block is done, whether some rank killed it (every rank's answer).
    """
    mine: list[bool] = []

    def kill(path: str, offset: int, length: int) -> None:
        if not mine:
            mine.append(True)
            with suppress(ProcessLookupError):   # another rank was first
                os.kill(pid, signal.SIGKILL)

    writes.write_observers.append(kill)
    killed: list[bool] = []
    try:
        yield killed
    finally:
        writes.write_observers.remove(kill)
        killed.append(any(comm.allgather(bool(mine))))


def _sync_or_again(comm, path: str) -> None:  # noqa: ANN001
    """A collective sync of ``path``; if it fails (on every rank, the data still dirty), a second one."""
    try:
        mpiburst.sync(path, comm=comm)
    except FlushError:
        mpiburst.sync(path, comm=comm)


def test_the_same_kill_without_replicas_loses_the_node_s_data(mpi_tmp_path: Path, server_binary: str,
                                                              three_nodes: None):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with started_tier(mpi_tmp_path, server_binary, comm, id="norep", capacity="64M", replicas=0) as tier:
        assert tier.conf.replicas == 0
        _write_close_kill(comm, tier, "burst://lost.dat")
        with pytest.raises(NodeLostError) as lost:
            _read_all(comm, "burst://lost.dat")
        assert lost.value.node == 1 and "lost.dat" in str(lost.value)


@pytest.mark.slow
def test_a_node_killed_during_a_commit_leaves_no_torn_cut_and_loses_nothing_with_replicas(mpi_tmp_path: Path,
                                                                                         server_binary: str,
                                                                                         three_nodes: None):
    # each rank closes a file of its own; node 1's server is killed at the first BFS write of a collective
    # commit of all six (node 1 holds ranks 2 and 3's files). The commit completes on node 1's promoted replica, or
    # fails on every rank having published nothing (or left its journal, which the next commit completes); a
    # second commit then completes it. Every file is exact on the BFS.
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bfs = mpi_tmp_path / "bfs"
    with started_tier(mpi_tmp_path, server_binary, comm, id="repc", capacity="64M", replicas=1) as tier:
        f = mpiburst.File.Open(MPI.COMM_SELF, f"burst://part{rank}.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
        f.Write_at(0, _pattern(rank))
        f.Close()
        comm.Barrier()
        with _killed_at_first_bfs_write(comm, tier.conf.nodes[1]["pid"]) as killed:
            try:
                mpiburst.commit(tier=tier, comm=comm)
                failed = False
            except FlushError:
                failed = True
        assert killed == [True]   # inside the commit
        assert len(set(comm.allgather(failed))) == 1   # every rank, or none
        if failed:   # nothing published, or the journal of a commit killed while publishing: no torn cut
            comm.Barrier()
            published = sorted(p.name for p in bfs.glob("part*.dat"))
            assert published == [] or list(bfs.glob(".mpiburst-commit-*.json"))
            comm.Barrier()
            mpiburst.commit(tier=tier, comm=comm)
        comm.Barrier()
        for r in range(size):
            assert np.array_equal(np.fromfile(bfs / f"part{r}.dat", dtype=np.uint8), _pattern(r))
        assert all(not m.dirty for m in tier.store.cut().values())
        assert any(comm.allgather(1 in tier.store.failed_over))   # the commit went on with node 1's replica
