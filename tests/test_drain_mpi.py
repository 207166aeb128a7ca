"""The drain with real MPI ranks (``mpiexec -n 2`` and ``-n 4``): strided records into one new shared file.

Every rank drains its own chunks (``c % size == rank``) while the file is
open; the collective sync afterwards keeps them and writes the rest. The
chunk is made two stripes so the test stays small.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
from mpi4py import MPI

from conftest import bfs_file
from mpiburst import File, drain, flush

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
RECORD = 47008


@pytest.fixture
def drain_tier(world_tier, monkeypatch):
    """conftest's ``world_tier`` with the drain on and a drain chunk of 2 stripes."""
    monkeypatch.setenv(drain.ENV, "1")
    monkeypatch.setattr(drain, "CHUNK", 2 * world_tier.align)
    return world_tier


def test_strided_records_drained_by_every_rank_then_flushed(drain_tier):
    chunk = drain.chunk_bytes(drain_tier.align)
    rounds = -(-(size * 2 + 1) * chunk // (RECORD * size))      # over two chunks per rank, and a partial one
    total = rounds * size * RECORD
    data = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8).tobytes()
    f = File.Open(comm, "burst://s.dat", MPI.MODE_CREATE | MPI.MODE_WRONLY)
    assert f._drain is not None
    for i in range(rounds):
        off = (i * size + rank) * RECORD
        f.Write_at(off, data[off:off + RECORD])
    f.Sync()                                   # every record is in the tier: every full chunk can go
    deadline = time.monotonic() + 60
    while rank not in f._drain.done:           # this rank's first chunk (a bounded wait)
        assert time.monotonic() < deadline, "the drain wrote nothing"
        time.sleep(0.01)
    f.Close()
    rep = flush.sync("burst://s.dat", comm=comm)
    assert rep.drained >= size * chunk         # each rank's first chunk at least, whoever flushes it
    assert rep.bytes + rep.drained == total
    target = bfs_file(drain_tier, "s.dat")
    if rank == 0:
        assert open(target, "rb").read() == data
        assert glob.glob(os.path.join(os.path.realpath(drain_tier.bfs_root), ".s.dat.mpiburst-*")) == []
        assert not drain_tier.store.meta(target).dirty
    comm.Barrier()


def test_close_returns_only_once_every_rank_published_its_drained_chunks(drain_tier, monkeypatch):
    """A flush right after Close must see every rank's drain record, however late a rank publishes it.

    The other ranks publish half a second late: if rank 0 could leave Close before them, its sync
    would claim without their chunks and leave their records behind.
    """
    chunk = drain.chunk_bytes(drain_tier.align)
    real = drain.Drain.publish

    def late(self):
        time.sleep(0.5)
        real(self)

    if rank != 0:
        monkeypatch.setattr(drain.Drain, "publish", late)
    data = np.random.default_rng(2).integers(0, 256, size * chunk, dtype=np.uint8).tobytes()
    f = File.Open(comm, "burst://late.dat", MPI.MODE_CREATE | MPI.MODE_WRONLY)
    f.Write_at(rank * chunk, data[rank * chunk:(rank + 1) * chunk])       # rank r: all of chunk r
    f.Sync()
    deadline = time.monotonic() + 60
    while rank not in f._drain.done:           # a bounded wait for this rank's chunk
        assert time.monotonic() < deadline, "the drain wrote nothing"
        time.sleep(0.01)
    f.Close()
    rep = flush.sync("burst://late.dat", comm=comm)
    assert rep.drained == size * chunk          # every rank's chunk adopted
    bfs = os.path.realpath(drain_tier.bfs_root)
    if rank == 0:
        assert open(os.path.join(bfs, "late.dat"), "rb").read() == data
        assert glob.glob(os.path.join(bfs, ".late.dat.mpiburst-*")) == []
    comm.Barrier()
