"""Checkpoints in a tier of three nodes with replicas: a node's server lost, the checkpoint still whole (#24 item 5).

SCR's PARTNER redundancy, in mpiburst's terms (docs/checkpoint.md): with
``replicas=1`` each node's server has a replica on the next node, so a
checkpoint kept only in the tier survives the loss of one node's server.
``tests/run.sh`` runs this file with ``-n 6`` and ``MPIBURST_RANKS_PER_NODE=2``
(three nodes of two ranks, a majority left to promote a replica); with
fewer ranks it is skipped.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import started_tier

import mpiburst
from mpiburst import nodes

pytestmark = [pytest.mark.mpi(min_size=6), pytest.mark.timeout(120)]

#: float64 values per rank in one checkpoint (a 48 KiB block each: the node's servers hold their ranks' blocks).
PER_RANK = 6000


def state(step: int, nranks: int) -> np.ndarray:
    """The whole array checkpoint ``step`` holds (every rank's block, end to end)."""
    return np.arange(nranks * PER_RANK, dtype=np.float64) * 0.25 + step


@pytest.fixture
def three_nodes(monkeypatch) -> None:
    """Two ranks per node: six ranks are three nodes."""
    monkeypatch.setenv(nodes.RANKS_PER_NODE, os.environ.get(nodes.RANKS_PER_NODE) or "2")


@pytest.mark.slow   # about 24 s at -n 6 on 2 cores: 8 s to start six servers, 9 s until node 1's replica serves
def test_a_checkpoint_only_in_the_tier_survives_a_node_s_server_killed_with_replicas(
        mpi_tmp_path: Path, server_binary: str, three_nodes: None):
    """Promise: with replicas=1, latest() and restore() still find and read a tier-only checkpoint exactly after
    one node's server is SIGKILLed, and close() then puts it on the BFS exactly."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bfs = mpi_tmp_path / "bfs"
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    with started_tier(mpi_tmp_path, server_binary, comm, id="ckrep", capacity="64M", replicas=1) as tier:
        ck = mpiburst.Checkpoints(comm, "sim", keep=2, flush_every=100)   # nothing flushed: the tier's copy only
        for step in (1, 2):
            with ck.save(step) as c:
                f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_WRONLY | MPI.MODE_CREATE)
                f.Write_at_all(rank * PER_RANK * 8, state(step, size)[mine])
                f.Close()
        comm.Barrier()
        if rank == 0:
            os.kill(tier.conf.nodes[1]["pid"], signal.SIGKILL)   # ranks 2 and 3 wrote their blocks there
        comm.Barrier()
        assert ck.latest() == 2              # from the tier: the BFS holds nothing yet
        for step in (2, 1):
            with ck.restore(step) as c:
                assert c.step == step        # no fallback to an older one
                got = np.empty(size * PER_RANK)
                f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_RDONLY)
                f.Read_at_all(0, got)
                f.Close()
            assert np.array_equal(got, state(step, size))
        assert 1 in tier.store.failed_over   # this rank read through node 1's promoted replica
        ck.close()                           # flushes the newest, after the failover
        comm.Barrier()
        assert np.array_equal(np.fromfile(bfs / "sim" / "ckpt.2" / "u.dat"), state(2, size))
