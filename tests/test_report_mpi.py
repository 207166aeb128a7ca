"""The I/O report with real MPI ranks (run under ``mpiexec -n 2`` and ``-n 4``): each rank's exact numbers."""

from __future__ import annotations

import os

import pytest

from mpiburst import flush, report
from mpiburst.file import File
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


def test_each_rank_and_the_collective_flush_are_counted_exactly(mpi_tmp_path, server_binary) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bfs = mpi_tmp_path / "bfs"
    if rank == 0:
        bfs.mkdir()
    comm.Barrier()
    with Tier.start(comm, id=f"r{os.getppid()}", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="256M",
                    server=server_binary, align="64K") as tier:
        fh = File.Open(comm, "burst://ckpt.dat", MPI.MODE_CREATE | MPI.MODE_RDWR)
        for i in range(100 + rank):                       # rank r: 100 + r interleaved 4 KiB records
            fh.Write_at((i * size + rank) * 4096, bytes([rank + 1]) * 4096)
        fh.Close()
        path = os.path.join(os.path.realpath(tier.bfs_root), "ckpt.dat")
        flushed = flush.sync(path, tier=tier, comm=comm)
        comm.Barrier()
        data = report.build(tier.store, run=tier.conf.id)
        (f,) = data["files"]
        assert f["path"] == path
        assert f["processes"].keys() == {f"rank {r}" for r in range(size)}
        for r in range(size):
            mine = f["processes"][f"rank {r}"]
            assert (mine["write_calls"], mine["write_bytes"], mine["read_calls"]) == (100 + r, (100 + r) * 4096, 0)
        calls = sum(100 + r for r in range(size))
        w = f["app"]["write"]
        assert (w["calls"], w["bytes"], w["hist"][2]) == (calls, calls * 4096, calls)
        assert (w["consecutive"], w["sequential"], w["other"]) == (1, calls - 1, 0)   # rank 0's first is at 0
        assert f["bfs"]["flushes"] == 1 and f["bfs"]["writes"] == flushed.writes
        assert f["bfs"]["bytes"] == flushed.bytes and len(data["flushes"]) == 1     # logged once, by rank 0
        comm.Barrier()
