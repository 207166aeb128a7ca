"""Checkpoints over real ranks and a real server (issue #24's "Checked by"; ``mpiexec -n 4``, also ``-n 2``)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from mpiburst import halt, server
from mpiburst.errors import CheckpointError
from mpiburst.testing.store import wait_for

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]

#: float64 values per rank in the first job (47 KiB, not a whole stripe).
PER_RANK = 6000


def state(step: int, nranks: int) -> np.ndarray:
    """The whole array checkpoint ``step`` holds (the first job's ``nranks`` slices, end to end)."""
    return np.arange(nranks * PER_RANK, dtype=np.float64) * 0.5 + step


def test_seven_saves_a_failed_eighth_then_a_smaller_job_on_a_new_tier_restarts_from_the_flushed_sixth(
        mpi_tmp_path, server_binary):
    """Promise: the newest complete checkpoint survives; a failed save never counts; a restart may change ranks.

    All ranks make 7 saves (keep=2, flush_every=3): saves 3 and 6 are
    flushed. After wait() latest() is 7 and reads back exactly. An 8th save
    in which rank 1 raises does not count (every rank raises, latest() stays
    7). Then the tier's server is killed: latest() says 6 (the BFS's), with
    a warning; half the ranks, on a new tier,
    find checkpoint 6 on the BFS and read it exactly; a halt set by their
    rank 0 makes should_exit() True on every one of them.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bfs = mpi_tmp_path / "bfs"
    if rank == 0:
        bfs.mkdir()
    comm.Barrier()
    tier = mpiburst.Tier.start(comm, id=f"ck{os.getppid()}", dir=str(mpi_tmp_path), bfs_root=str(bfs),
                               capacity="256M", server=server_binary)
    try:
        ck = mpiburst.Checkpoints(comm, "sim", keep=2, flush_every=3)
        assert ck.latest() is None
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for step in range(1, 8):
            with ck.save(step) as c:
                f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_WRONLY | MPI.MODE_CREATE)
                f.Write_at_all(rank * PER_RANK * 8, state(step, size)[mine])
                f.Close()
            assert c.flushing == (step % 3 == 0)
        ck.wait()
        assert ck.saves == 7          # on every rank
        assert ck.latest() == 7
        with ck.restore(7) as c:
            got = np.empty(size * PER_RANK)
            f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_RDONLY)
            f.Read_at_all(0, got)
            f.Close()
        assert np.array_equal(got, state(7, size))

        with pytest.raises((CheckpointError, RuntimeError)) as failed, ck.save(8) as c:
            f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_WRONLY | MPI.MODE_CREATE)
            f.Write_at_all(rank * PER_RANK * 8, state(8, size)[mine])
            f.Close()
            if rank == 1:
                raise RuntimeError("rank 1 found its state wrong")
        assert isinstance(failed.value, RuntimeError if rank == 1 else CheckpointError)
        assert ck.latest() == 7
        comm.Barrier()
        if rank == 0:
            os.kill(tier.conf.pid, signal.SIGKILL)
            assert wait_for(lambda: not server.pid_alive(tier.conf.pid, server_binary), timeout=30)
        comm.Barrier()
        if rank == 0:     # rank 0 looks and warns; every rank gets its answer
            with pytest.warns(RuntimeWarning, match="the tier cannot be read"):
                assert ck.latest() == 6
        else:
            assert ck.latest() == 6
    finally:
        if rank == 0:
            tier.stop()
        else:
            tier.disconnect()

    small = comm.Split(0 if rank < size // 2 else MPI.UNDEFINED, rank)
    if small != MPI.COMM_NULL:
        with mpiburst.Tier.start(small, id=f"ck2{os.getppid()}", dir=str(mpi_tmp_path), bfs_root=str(bfs),
                                 capacity="64M", server=server_binary) as small_tier:
            again = mpiburst.Checkpoints(small, "sim", keep=2, flush_every=3)
            assert again.latest() == 6
            n, r = small.Get_size(), small.Get_rank()
            share = size * PER_RANK // n
            with again.restore(6) as c:
                part = np.empty(share)
                f = mpiburst.File.Open(small, c.path("u.dat"), MPI.MODE_RDONLY)
                f.Read_at_all(r * share * 8, part)
                f.Close()
            assert np.array_equal(part, state(6, size)[r * share:(r + 1) * share])
            assert not again.should_exit()
            if r == 0:
                halt.set_halt(halt.halt_path(small_tier.conf.dir, small_tier.id), immediate=True)
            assert again.should_exit() and again.exit_reason == "halt --immediate"   # rank 0 decides for all
            again.close()
        small.Free()
    comm.Barrier()
