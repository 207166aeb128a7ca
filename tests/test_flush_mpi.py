"""Collective flushes with real MPI ranks and a real server (run under ``mpiexec -n 2`` and ``-n 4``).

Each rank commits its own writes (its channel) and every rank builds the same
reference model; writes that overlap across ranks are committed in turns
separated by barriers so arrival order, and so the model, is deterministic.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from mpiburst import flush
from mpiburst.errors import FlushError
from mpiburst.tier import Tier

from mpiburst.testing import Model, put

from conftest import ALIGN, bfs_file, check_aligned

RECORD = 47008

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


@pytest.fixture
def run(mpi_tmp_path, server_binary):
    """A real tier started collectively (align 64 KiB), yielding ``(comm, tier, store)``."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bfs = mpi_tmp_path / "bfs"
    if comm.Get_rank() == 0:
        bfs.mkdir()
    comm.Barrier()
    with Tier.start(comm, id=f"m{os.getppid()}", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="256M",
                    server=server_binary, align="64K") as tier:
        yield comm, tier, tier.store
        flush.writes.write_observers.clear()


def _create(comm, store, path: str, size: int | None = None) -> None:
    if comm.Get_rank() == 0:
        store.create(path, size)
    comm.Barrier()


def _check(comm, path: str, model: Model, rep) -> None:
    if comm.Get_rank() == 0:
        assert open(path, "rb").read() == bytes(model.data)
    assert rep.size == len(model.data)
    comm.Barrier()


def test_segmented(run):
    comm, tier, store = run
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    path = bfs_file(tier, "seg.dat")
    _create(comm, store, path)
    seg = 1_000_000
    model = Model()
    for r in range(nprocs):
        rnd = random.Random(r)
        writes = [(r * seg + o, rnd.randbytes(min(RECORD, seg - o))) for o in range(0, seg, RECORD)]
        if r == rank:
            put(store, path, None, writes, channel=rank)
        for off, data in writes:
            model.write(off, data)
    comm.Barrier()
    seen = []
    flush.writes.write_observers.append(lambda p, o, n: seen.append((p, o, n)))
    rep = flush.sync(path, tier=tier, comm=comm, verify=True)
    _check(comm, path, model, rep)
    check_aligned(seen, rep.size)
    assert rep.writes == nprocs                             # each rank's contiguous stripes in one write
    counts = comm.allgather(len(seen))
    assert sum(counts) == rep.writes and min(counts) > 0    # every rank wrote its own stripes
    assert rep.checksum is not None


def test_strided_47008_records_over_an_existing_file(run):
    """Strided unaligned records partly overwrite an existing BFS file; the rest of it is kept."""
    comm, tier, store = run
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    path = bfs_file(tier, "strided.dat")
    original = random.Random(99).randbytes(3 << 20)
    if rank == 0:
        with open(path, "wb") as f:
            f.write(original)
    _create(comm, store, path, len(original))
    model = Model(original)
    for r in range(nprocs):
        rnd = random.Random(100 + r)
        writes = [((i * nprocs + r) * RECORD + 777, rnd.randbytes(RECORD)) for i in range(12)]
        if r == rank:
            put(store, path, None, writes, channel=rank)
        for off, data in writes:
            model.write(off, data)
    comm.Barrier()
    rep = flush.sync(path, tier=tier, comm=comm)
    _check(comm, path, model, rep)


def test_n_to_n(run):
    """File per rank, each flushed by its own rank alone (COMM_SELF)."""
    from mpi4py import MPI

    comm, tier, store = run
    rank = comm.Get_rank()
    path = bfs_file(tier, f"nn.{rank}")
    store.create(path, None)
    model = Model()
    rnd = random.Random(rank)
    put(store, path, model, [(o, rnd.randbytes(5000)) for o in range(0, 400_000, 5000)], channel=rank)
    rep = flush.sync(path, tier=tier, comm=MPI.COMM_SELF)
    assert open(path, "rb").read() == bytes(model.data) and rep.size == 400_000
    comm.Barrier()


def test_random_overlapping_writes_and_truncation(run):
    """Random overlapping writes from every rank in turns, a truncation, syncs between: identical file."""
    comm, tier, store = run
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    path = bfs_file(tier, "random.dat")
    _create(comm, store, path)
    model = Model()
    rnd = random.Random(7)                          # same stream on every rank: same model
    for turn in range(3 * nprocs):
        writer = turn % nprocs
        writes = [(rnd.randrange(0, 2_000_000), rnd.randbytes(rnd.randrange(1, 200_000))) for _ in range(5)]
        if writer == rank:
            put(store, path, None, writes, channel=rank)
        for off, data in writes:
            model.write(off, data)
        comm.Barrier()
        if turn == nprocs:
            rep = flush.sync(path, tier=tier, comm=comm)
            _check(comm, path, model, rep)
        if turn == 2 * nprocs:
            if rank == 0:
                store.set_size(path, 900_000)
            model.truncate(900_000)
            comm.Barrier()
    rep = flush.sync(path, tier=tier, comm=comm)
    _check(comm, path, model, rep)


def test_one_rank_failing_fails_every_rank_fast_and_keeps_data_dirty(run):
    """An EIO on the last rank's first write: every rank raises FlushError within seconds; a retry completes."""
    comm, tier, store = run
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    path = bfs_file(tier, "fail.dat")
    _create(comm, store, path)
    model = Model()
    rnd = random.Random(3)
    writes = [(o, rnd.randbytes(200_000)) for o in range(0, 4 << 20, 200_000)]
    if rank == 0:
        put(store, path, None, writes)
    for off, data in writes:
        model.write(off, data)
    comm.Barrier()

    def fail(p, off, n):
        raise OSError(5, "Input/output error")

    if rank == nprocs - 1:
        flush.writes.write_observers.append(fail)
    started = time.monotonic()
    with pytest.raises(FlushError, match=r"fail\.dat failed: Input/output error \[EIO\]"):
        flush.sync(path, tier=tier, comm=comm)
    assert time.monotonic() - started < 10
    flush.writes.write_observers.clear()
    meta = store.meta(path)
    assert meta.dirty and meta.clean == 0
    comm.Barrier()
    assert not os.path.exists(path)
    rep = flush.sync(path, tier=tier, comm=comm)
    _check(comm, path, model, rep)
