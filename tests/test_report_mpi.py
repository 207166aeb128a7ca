"""The I/O report and live progress with real MPI ranks (under ``mpiexec -n 2`` and ``-n 4``).

Each rank's exact numbers in the report; the progress of a collective
``mpiburst.sync`` counts every rank's bytes.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import started_tier

from mpiburst import flush, progress, report
from mpiburst.file import File

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


def test_each_rank_and_the_collective_flush_are_counted_exactly(mpi_tmp_path, server_binary) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with started_tier(mpi_tmp_path, server_binary, comm, id=f"r{os.getppid()}", align="64K") as tier:
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


#: Bytes each rank writes for the progress tests: two of the flush's write batches per rank.
_PER_RANK = 12 << 20


def _sync_with_progress(mpi_tmp_path, server_binary, monkeypatch, progress_on_rank, before_write=None):
    """Each rank writes its own :data:`_PER_RANK` bytes, then a collective sync; return (report, progress values).

    ``progress_on_rank(rank)`` says whether a rank gives a progress callback;
    ``before_write``, if given, runs before each of the flush's BFS writes.
    Checks that the sync left no progress counter in the tier.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    seen: list[int] = []
    counters: set[str] = set()
    name = flush.orchestrate.progress_counter
    monkeypatch.setattr(flush.orchestrate, "progress_counter", lambda plan: counters.add(name(plan)) or name(plan))
    if before_write is not None:
        write = flush.writes.pwrite_all

        def paced(*args):
            before_write()
            write(*args)

        monkeypatch.setattr(flush.writes, "pwrite_all", paced)
    with started_tier(mpi_tmp_path, server_binary, comm, id=f"p{os.getppid()}", capacity="512M", align="1M") as tier:
        fh = File.Open(comm, "burst://big.dat", MPI.MODE_CREATE | MPI.MODE_WRONLY)
        fh.Write_at(rank * _PER_RANK, bytes([rank + 1]) * _PER_RANK)
        fh.Close()
        path = os.path.join(os.path.realpath(tier.bfs_root), "big.dat")
        flushed = flush.sync(path, tier=tier, comm=comm, progress=seen.append if progress_on_rank(rank) else None)
        comm.Barrier()
        assert len(counters) == 1 and tier.store.shared_pointer(path, counters.pop()) == 0   # dropped
        comm.Barrier()
    return flushed, seen


def test_progress_of_a_collective_sync_counts_every_rank(mpi_tmp_path, server_binary, monkeypatch) -> None:
    """Every rank shows progress: the last rank to add its bytes sees the whole job's, before the sync ends."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    monkeypatch.setattr(progress, "SHARE_EVERY", 0.0)          # share at every write
    flushed, seen = _sync_with_progress(mpi_tmp_path, server_binary, monkeypatch, lambda rank: True)
    total = comm.Get_size() * _PER_RANK
    live, final = seen[:-1], seen[-1]
    assert flushed.bytes == total and final == total
    assert live and live == sorted(live) and live[-1] >= _PER_RANK
    assert max(comm.allgather(live[-1])) == total           # without sharing, no rank sees more than its own


def test_progress_shown_by_rank_0_alone_counts_every_rank(mpi_tmp_path, server_binary, monkeypatch) -> None:
    """Only rank 0 shows progress; the others still add their bytes, so rank 0's live figure reaches the total.

    Rank 0 writes its first stripes only once every other rank has shared
    all its bytes (a flag file each, a wait of at most 20 s), so its live figures
    must include them.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    monkeypatch.setattr(progress, "SHARE_EVERY", 0.0)
    flags = mpi_tmp_path / "shared"
    if rank == 0:
        flags.mkdir()
    comm.Barrier()
    share = progress.JobBytes._share

    def share_and_flag(job):
        share(job)
        if job.mine == _PER_RANK:
            (flags / str(rank)).touch()

    def wait_for_the_others():
        deadline = time.monotonic() + 20      # within the flush lease (30 s) rank 0 does not renew meanwhile
        while len(os.listdir(flags)) < size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    if rank:
        monkeypatch.setattr(progress.JobBytes, "_share", share_and_flag)
    flushed, seen = _sync_with_progress(mpi_tmp_path, server_binary, monkeypatch, lambda r: r == 0,
                                        wait_for_the_others if rank == 0 else None)
    if rank == 0:
        assert len(os.listdir(flags)) == size - 1
        live = seen[:-1]
        assert live and live[-1] == size * _PER_RANK and seen[-1] == flushed.bytes == size * _PER_RANK
    else:
        assert seen == []
