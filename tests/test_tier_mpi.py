"""Tier.start is collective: real MPI ranks (run by tests/run.sh under mpiexec -n 2 and -n 4)."""

from __future__ import annotations

import os

import pytest

from mpiburst import server
from mpiburst.errors import ConfigError
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


def test_start_collective(mpi_tmp_path, server_binary):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with Tier.start(comm, id="mpi", dir=str(mpi_tmp_path), capacity="64M", server=server_binary) as tier:
        assert tier.channels == size  # default: one channel per rank
        assert comm.allgather(tier.conf.pid) == [tier.conf.pid] * size  # one server for all
        assert Tier.current() is tier
        tier.redis.set(f"rank:{rank}".encode(), str(rank * 10).encode())
        comm.Barrier()
        values = [tier.redis.get(f"rank:{r}".encode()) for r in range(size)]
        assert values == [str(r * 10).encode() for r in range(size)]
        assert tier.status()["clients"] >= size
        pid = tier.conf.pid
    comm.Barrier()
    assert not server.pid_alive(pid, server_binary)  # rank 0 stopped it after everyone left
    if rank == 0:
        assert os.listdir(mpi_tmp_path) == []


def test_start_error_reaches_every_rank(mpi_tmp_path, server_binary):
    from mpi4py import MPI

    with pytest.raises(ConfigError, match="at least 1"):
        Tier.start(MPI.COMM_WORLD, channels=0, id="bad", dir=str(mpi_tmp_path), server=server_binary)
    MPI.COMM_WORLD.Barrier()
    assert os.listdir(mpi_tmp_path) == []
