"""Flush locality on a real cluster (#15 item 3): each node's ranks write the stripes whose bytes their node holds.

``tests/run.sh`` runs this file under ``mpiexec -n 2`` and ``-n 4`` (every
rank a node: 2 and 4 servers) and with ``MPIBURST_RANKS_PER_NODE=2 mpiexec
-n 6`` (three nodes of two ranks). The run is started as an application
starts it (``Tier.start(COMM_WORLD)``), every rank writes its batches to its
own node's server, and ``flush.sync(comm=COMM_WORLD)`` flushes. Each test
keeps a model of the file (every write, in arrival order) and of which node
holds which bytes, and checks the BFS bytes, which stripes each rank wrote,
and how many payload bytes each rank fetched from each server (the store's
own ``read_bytes`` counters).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import started_tier

from mpiburst import flush, nodes, residency
from mpiburst.errors import FlushError, NodeLostError
from mpiburst.store.cluster_store import ClusterStore
from mpiburst.testing import Model, put, put_runs
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]

ALIGN = 64 << 10


@pytest.fixture
def ctier(mpi_tmp_path: Path, server_binary: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """A run started with ``Tier.start(COMM_WORLD)``, one server per node; yields ``(comm, tier, store, where)``.

    ``where[r]`` is rank ``r``'s node. Without ``$MPIBURST_RANKS_PER_NODE``
    every rank is a node, so -n 2 and -n 4 runs are real clusters too.
    """
    from mpi4py import MPI

    if not os.environ.get(nodes.RANKS_PER_NODE):
        monkeypatch.setenv(nodes.RANKS_PER_NODE, "1")
    monkeypatch.delenv(flush.locality.LOCALITY_ENV, raising=False)
    comm = MPI.COMM_WORLD
    with started_tier(mpi_tmp_path, server_binary, comm, id="fl", align=str(ALIGN)) as tier:
        store = tier.store
        assert isinstance(store, ClusterStore)
        yield comm, tier, store, comm.allgather(store.local)
        comm.Barrier()


def _data(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class _Layout:
    """The writes of every rank in arrival order: the file's model and each node's bytes per stripe."""

    def __init__(self, nodes_: int, nstripes: int) -> None:
        self.model = Model()
        self.held = np.zeros((nodes_, nstripes), dtype=np.int64)

    def write(self, node: int, offset: int, data: bytes) -> None:
        self.model.write(offset, data)
        self.hold(node, offset, len(data))

    def hold(self, node: int, offset: int, length: int) -> None:
        for s in range(offset // ALIGN, (offset + length - 1) // ALIGN + 1):
            self.held[node, s] += min(offset + length, (s + 1) * ALIGN) - max(offset, s * ALIGN)


def _interleaved(comm, store: ClusterStore, where: list[int], path: str, turns: int) -> _Layout:
    """Write a file whose stripes are dealt to the ranks out of order, then ``turns`` cross-node overlaps.

    Phase 1: stripe ``s`` is written whole by rank ``(5 s + 1) mod size`` (so
    the contiguous shares of a plain collective flush would mostly read
    another node's bytes), plus one strided run per rank (4 KiB blocks, one
    per stripe, in 2 stripes mostly written by others). Phase 2: in turn, the first
    rank of node ``t`` overwrites 100 KiB across a stripe boundary, each
    overlapping the one before; turns are barrier-separated, so later turns
    arrive later and must win.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    nodes_ = max(where) + 1
    nstripes = 8 * size
    layout = _Layout(nodes_, nstripes)
    if rank == 0:
        store.create(path, None)
    comm.Barrier()
    mine = []
    for s in range(nstripes):
        writer = (5 * s + 1) % size
        data = _data(ALIGN, s)
        layout.write(where[writer], s * ALIGN, data)
        if writer == rank:
            mine.append((s * ALIGN, data))
    put(store, path, None, mine, channel=rank)
    comm.Barrier()
    for r in range(size):                    # one strided run each, in turn: 4 KiB in 2 stripes of others
        first = (r * 7 + 2) % (nstripes - 2)
        data = _data(2 * 4096, 500 + r)
        if r == rank:
            put_runs(store, path, None, [(first * ALIGN + 8192, data, 4096, ALIGN)], channel=rank)
        for i in range(2):
            layout.write(where[r], (first + i) * ALIGN + 8192, data[i * 4096:(i + 1) * 4096])
        comm.Barrier()
    leaders = [where.index(k) for k in range(nodes_)]
    for t in range(turns):
        node = (nodes_ - 1 - t) % nodes_
        offset = (3 + 2 * t) * ALIGN + 20_000
        data = _data(100 << 10, 900 + t)
        if rank == leaders[node]:
            put(store, path, None, [(offset, data)], channel=rank)
        layout.write(node, offset, data)
        comm.Barrier()
    return layout


def _flush_and_watch(comm, tier: Tier, store: ClusterStore, path: str) -> tuple[flush.FlushReport, list, list[int]]:
    """Collective sync of ``path``; return its report, the stripes this rank wrote and its reads per server."""
    written: list[int] = []

    def seen(p: str, offset: int, length: int) -> None:
        if p == path:
            written.extend(range(offset // ALIGN, (offset + length - 1) // ALIGN + 1))

    before = list(store.read_bytes)
    flush.writes.write_observers.append(seen)
    try:
        report = flush.sync(path, tier=tier, comm=comm, verify=True)
    finally:
        flush.writes.write_observers.remove(seen)
    return report, sorted(set(written)), [a - b for a, b in zip(store.read_bytes, before)]


@pytest.mark.parametrize("locality", ["on", "off"])
def test_each_rank_writes_and_reads_its_own_node_s_stripes(ctier, monkeypatch, locality) -> None:
    """Every stripe is written by a rank of the node holding most of its bytes, which reads only what the
    model says lies on each server; overlaps of different nodes resolve in arrival order; all is clean after.
    With locality off, the contiguous shares read other nodes' bytes: the counters see the difference."""
    comm, tier, store, where = ctier
    rank = comm.Get_rank()
    if locality == "off":
        monkeypatch.setenv(flush.locality.LOCALITY_ENV, "0")
    path = os.path.join(os.path.realpath(tier.bfs_root), f"loc-{locality}.dat")
    layout = _interleaved(comm, store, where, path, turns=3)
    report, stripes, reads = _flush_and_watch(comm, tier, store, path)
    expected = bytes(layout.model.data)
    assert report.size == len(expected) and report.bytes == len(expected)
    if rank == 0:
        with open(path, "rb") as f:
            assert f.read() == expected
    everyone = comm.allgather(stripes)
    assert sorted(s for mine in everyone for s in mine) == list(range(layout.held.shape[1]))  # each stripe once
    me = where[rank]
    # what this rank fetched from each server is exactly those servers' bytes of the stripes it wrote
    assert reads == [int(layout.held[k, stripes].sum()) for k in range(len(store.clients))]
    remote = comm.allreduce(sum(reads) - reads[me])
    if locality == "on":
        assert all(layout.held[me, s] == layout.held[:, s].max() for s in stripes)
        mixed = [s for s in range(layout.held.shape[1]) if np.count_nonzero(layout.held[:, s]) > 1]
        pure_mine = [s for s in stripes if s not in mixed]
        assert reads[me] >= int(layout.held[me, pure_mine].sum()) > 0     # every rank flushed some of its own
        assert remote == sum(int(layout.held[:, s].sum() - layout.held[:, s].max()) for s in mixed)
    else:
        assert remote > layout.held.sum() // 4        # the test sees remote reads when there are some
    stat = residency.frag_stat(path, tier=tier)
    assert stat.dirty == 0
    comm.Barrier()


def test_a_write_after_the_snapshot_stays_dirty_and_off_the_bfs(ctier, monkeypatch) -> None:
    """A batch arriving on the last node while the flush runs (after its snapshot) is neither written nor
    marked clean: the next sync writes it."""
    comm, tier, store, where = ctier
    rank, size = comm.Get_rank(), comm.Get_size()
    path = os.path.join(os.path.realpath(tier.bfs_root), "late.dat")
    layout = _interleaved(comm, store, where, path, turns=1)
    snapshot = bytes(layout.model.data)
    late = _data(3 * ALIGN, 77)
    if rank == size - 1:
        real, done = flush.writes.write_run, []

        def write_late_then_flush(store_, plan, *args, **kwargs):
            if not done:
                put(store, path, None, [(ALIGN, late)], channel=rank)     # after the snapshot, on this node
                done.append(1)
            return real(store_, plan, *args, **kwargs)

        monkeypatch.setattr(flush.writes, "write_run", write_late_then_flush)
    flush.sync(path, tier=tier, comm=comm)
    if rank == 0:
        with open(path, "rb") as f:
            assert f.read() == snapshot
    comm.Barrier()
    # every rank looks before any starts the next sync (whose snapshot makes the late batch pending)
    stats = comm.allgather(residency.frag_stat(path, tier=tier))
    assert [s.dirty for s in stats] == [len(late)] * size   # exactly the late batch is still dirty
    layout.model.write(ALIGN, late)
    flush.sync(path, tier=tier, comm=comm)
    if rank == 0:
        with open(path, "rb") as f:
            assert f.read() == bytes(layout.model.data)
    assert residency.frag_stat(path, tier=tier).dirty == 0
    comm.Barrier()


def test_a_node_index_that_cannot_be_read_fails_every_rank_and_loses_nothing(ctier, monkeypatch) -> None:
    """The last node's first rank cannot list its server's index: every rank raises the same FlushError,
    nothing is published or marked clean, and the next sync writes it all."""
    comm, tier, store, where = ctier
    rank = comm.Get_rank()
    path = os.path.join(os.path.realpath(tier.bfs_root), "lost.dat")
    layout = _interleaved(comm, store, where, path, turns=2)
    last = max(where)
    if rank == where.index(last):
        real, done = store.node_index, []

        def lost_once(path_, node, page=4096):
            if not done:
                done.append(1)
                raise NodeLostError(f"lost the connection to the tier server of node {node} (test)", node)
            return real(path_, node, page)

        monkeypatch.setattr(store, "node_index", lost_once)
    with pytest.raises(FlushError, match=f"node {last}.*the data stays dirty"):
        flush.sync(path, tier=tier, comm=comm)
    assert not os.path.exists(path)
    assert residency.frag_stat(path, tier=tier).clean == 0
    comm.Barrier()
    flush.sync(path, tier=tier, comm=comm)                  # the lease and the lock were given back
    if rank == 0:
        with open(path, "rb") as f:
            assert f.read() == bytes(layout.model.data)
    comm.Barrier()


def test_a_communicator_inside_one_node_flushes_as_before(ctier) -> None:
    """Ranks of one node flush a file every node wrote: no locality to plan, the contiguous shares gather it."""
    comm, tier, store, where = ctier
    rank = comm.Get_rank()
    path = os.path.join(os.path.realpath(tier.bfs_root), "one-node.dat")
    layout = _interleaved(comm, store, where, path, turns=2)
    sub = comm.Split(0 if where[rank] == 0 else 1, rank)
    try:
        if where[rank] == 0:
            report = flush.sync(path, tier=tier, comm=sub, verify=True)
            assert report.size == len(layout.model.data)
            assert store.read_bytes[0] < sum(store.read_bytes) or len(store.clients) == 1
            if sub.Get_rank() == 0:
                with open(path, "rb") as f:
                    assert f.read() == bytes(layout.model.data)
    finally:
        sub.Free()
    comm.Barrier()
    assert residency.frag_stat(path, tier=tier).dirty == 0
    comm.Barrier()
