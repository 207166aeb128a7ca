"""A collective commit of many small files with real MPI ranks and a real server (run under ``mpiexec -n 2``).

Each rank writes its own files (file per process) through ``mpiburst.File``
on ``COMM_SELF``; ``flush.commit(comm=...)`` shares the cut's files among the
ranks. A failure on one rank in the middle publishes nothing on any rank.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import on_bfs

import mpiburst
from mpiburst import flush
from mpiburst.flush import writes

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


def _write(rank: int, n: int) -> dict[str, bytes]:
    """Write ``n`` files of this rank (varied sizes) on COMM_SELF; return BFS path -> bytes of every rank's files."""
    from mpi4py import MPI

    mine = {}
    for i in range(n):
        data = np.random.default_rng(rank * 1000 + i).integers(0, 256, 1 + 7919 * i, dtype=np.uint8)
        url = f"burst://out/{rank}/f{i}"
        f = mpiburst.File.Open(MPI.COMM_SELF, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
        f.Write_at(0, data)
        f.Close()
        mine[os.path.join(mpiburst.Tier.current().bfs_root, "out", str(rank), f"f{i}")] = data.tobytes()
    everyone: dict[str, bytes] = {}
    for part in MPI.COMM_WORLD.allgather(mine):
        everyone |= part
    return everyone


def test_a_collective_commit_of_many_files_is_all_or_nothing_across_ranks(world_tier, monkeypatch):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    files = _write(comm.rank, 12)
    bad = sorted(files)[-2]   # in rank 0's share (every size-th file of the cut): the other ranks fail with it

    def broken(path: str, offset: int, length: int) -> None:
        if path == bad:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(writes, "write_observers", [broken])   # on every rank: only the one flushing it fails
    with pytest.raises(mpiburst.FlushError, match=f"commit of {len(files)} files failed"):
        flush.commit(tier=world_tier, comm=comm)
    comm.Barrier()
    assert on_bfs(files) == {}                                # nothing of any rank's share
    assert all(m.dirty for m in mpiburst.residency.ls(tier=world_tier))
    monkeypatch.setattr(writes, "write_observers", [])
    reports = flush.commit(tier=world_tier, comm=comm)
    assert [r.path for r in reports] == sorted(files)          # every file, on every rank
    comm.Barrier()
    assert on_bfs(files) == files
    assert not any(m.dirty for m in mpiburst.residency.ls(tier=world_tier))


def test_a_collective_commit_meeting_another_flush_on_one_rank_gives_every_lease_back(world_tier, monkeypatch):
    """Each rank takes its files' leases at one go (#25); when another flush holds one of rank 1's, rank 0's are
    given back too before rank 0 commits the whole cut alone, waiting for each lease (here at most 5 s)."""
    import threading

    from mpi4py import MPI

    from mpiburst.flush import snapshot

    comm = MPI.COMM_WORLD
    files = _write(comm.rank, 6)
    monkeypatch.setattr(snapshot, "LEASE_WAIT", 5.0)     # a lease of its own left held would fail rank 0's commit
    timer = None
    if comm.rank == 1:
        held = world_tier.store.flush_lease(sorted(files)[1], 30)   # in rank 1's share: another flush, ending soon
        assert held is not None
        timer = threading.Timer(0.5, held.release)
        timer.start()
    comm.Barrier()
    try:
        reports = flush.commit(tier=world_tier, comm=comm)
    finally:
        if timer is not None:
            timer.cancel()
    assert [r.path for r in reports] == sorted(files)
    assert on_bfs(files) == files
    assert not any(world_tier.store.leased(p) for p in files)
