"""The cluster store under real MPI ranks: one server per node, every node's bytes on its own server.

Run with ``MPIBURST_RANKS_PER_NODE=2 mpiexec -n 6 ... --with-mpi`` (three
nodes of two ranks); without the variable every rank counts as a node, so the
usual ``-n 2`` and ``-n 4`` runs exercise two and four servers. The run is
started as an application starts it, ``Tier.start(COMM_WORLD)``: each node's
first rank starts its node's server, rank 0 forms the cluster, and every
rank's ``tier.store`` is a :class:`~mpiburst.store.cluster_store.ClusterStore`
writing to its own node's server; the driver, the flush, residency and h5py
run on it as an application's ranks do. Each test checks, by asking each
server directly, that it holds exactly the bytes its node's ranks wrote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import mpiburst
from conftest import bfs_file
from mpiburst import File, flush, nodes, residency
from mpiburst.store import file_id
from mpiburst.store.cluster_store import ClusterStore
from mpiburst.testing import Model
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]


def _layout(size: int) -> tuple[int, list[tuple[int, int]]]:
    """Return ranks per node and each node's ``[lo, hi)`` of ranks (``MPIBURST_RANKS_PER_NODE``, default 1)."""
    per = int(os.environ.get(nodes.RANKS_PER_NODE, "1"))
    return per, [(lo, min(lo + per, size)) for lo in range(0, size, per)]


@pytest.fixture
def ctier(mpi_tmp_path: Path, server_binary: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, Tier, ClusterStore, int]]:
    """A run started collectively with ``Tier.start``: one server per node; yields ``(comm, tier, store, node)``."""
    from mpi4py import MPI

    if not os.environ.get(nodes.RANKS_PER_NODE):
        monkeypatch.setenv(nodes.RANKS_PER_NODE, "1")        # every rank a node: a real cluster under -n 2 / -n 4
    comm = MPI.COMM_WORLD
    bfs = mpi_tmp_path / "bfs"
    if comm.Get_rank() == 0:
        bfs.mkdir()
    comm.Barrier()
    with Tier.start(comm, id="cl", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="256M", server=server_binary,
                    align="64K") as tier:
        store = tier.store
        assert isinstance(store, ClusterStore) and store.nodes == len(_layout(comm.Get_size())[1])
        assert store.local == comm.Get_rank() // _layout(comm.Get_size())[0]
        yield comm, tier, store, store.local


def _bytes_on_each_server(store: ClusterStore, path: str) -> list[int]:
    """Return the payload bytes of ``path`` each server holds, asking each server itself."""
    out = []
    for client in store.clients:
        keys = list(client.scan_iter(match=f"*{{{file_id(path)}}}:b:*", count=1000))
        out.append(sum(int(client.strlen(k)) for k in keys))
    return out


def _pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _rw() -> int:
    from mpi4py import MPI

    return MPI.MODE_CREATE | MPI.MODE_RDWR


def test_driver_writes_stay_on_their_node_and_read_back_everywhere(ctier) -> None:
    """Write_at and Write_at_all: each server holds exactly its node's ranks' bytes; every rank reads every byte."""
    comm, tier, store, node = ctier
    rank, size = comm.Get_rank(), comm.Get_size()
    _, ranks = _layout(size)
    block = 300_000
    with File.Open(comm, "burst://drv.dat", _rw()) as f:
        f.Write_at(rank * 2 * block, _pattern(block, rank))
        f.Write_at_all(rank * 2 * block + block, _pattern(block, 100 + rank))
    path = bfs_file(tier, "drv.dat")
    held = _bytes_on_each_server(store, path)
    assert held == [(hi - lo) * 2 * block for lo, hi in ranks]          # no byte crossed to another node
    expected = b"".join(_pattern(block, r) + _pattern(block, 100 + r) for r in range(size))
    with File.Open(comm, "burst://drv.dat", _rw()) as f:
        buf = bytearray(len(expected))
        f.Read_at_all(0, buf)
    assert bytes(buf) == expected
    comm.Barrier()


def test_overlapping_writes_of_different_nodes_resolve_in_arrival_order(ctier) -> None:
    """Each node in turn overwrites an overlapping range (turns closed and barrier-separated); the last wins."""
    comm, tier, store, node = ctier
    rank, size = comm.Get_rank(), comm.Get_size()
    per, ranks = _layout(size)
    model = Model()
    for turn in list(range(len(ranks))) + [0]:
        lo = turn * 50_000
        data = _pattern(200_000, 1000 + turn)
        with File.Open(comm, "burst://ovl.dat", _rw()) as f:
            if rank == ranks[turn][0]:
                f.Write_at(lo, data)
        model.write(lo, data)
    with File.Open(comm, "burst://ovl.dat", _rw()) as f:
        buf = bytearray(len(model.data))
        f.Read_at(0, buf)
    assert bytes(buf) == bytes(model.data)
    held = _bytes_on_each_server(store, bfs_file(tier, "ovl.dat"))
    assert held[0] == 400_000 and all(n == 200_000 for n in held[1:])
    rep = flush.sync(bfs_file(tier, "ovl.dat"), tier=tier, comm=comm, verify=True)
    assert rep.size == len(model.data)
    if rank == 0:
        assert open(bfs_file(tier, "ovl.dat"), "rb").read() == bytes(model.data)
    comm.Barrier()


def test_flush_and_residency_gather_from_every_server(ctier) -> None:
    """A file spread over every node: collective sync writes it whole, frag-stat counts every node's bytes,
    purge -k frees every server, reads then come from the BFS, prestage puts it back (on the prestaging node)."""
    comm, tier, store, node = ctier
    rank, size = comm.Get_rank(), comm.Get_size()
    _, ranks = _layout(size)
    block = 200_000
    with File.Open(comm, "burst://res.dat", _rw()) as f:
        f.Write_at_all(rank * block, _pattern(block, 7 + rank))
    path = bfs_file(tier, "res.dat")
    expected = b"".join(_pattern(block, 7 + r) for r in range(size))
    stat = residency.frag_stat(path, tier=tier)
    assert (stat.dirty, stat.clean) == (size * block, 0)
    comm.Barrier()
    rep = flush.sync(path, tier=tier, comm=comm, verify=True)
    assert rep.size == len(expected)
    stat = residency.frag_stat(path, tier=tier)
    assert (stat.dirty, stat.clean) == (0, size * block)
    if rank == 0:
        assert open(path, "rb").read() == expected
        residency.pin(path, tier=tier)
    comm.Barrier()
    assert store.meta(path).pinned
    comm.Barrier()
    if rank == 0:
        residency.unpin(path, tier=tier)
        assert residency.purge(path, clean_only=True, tier=tier) == size * block
    comm.Barrier()
    assert _bytes_on_each_server(store, path) == [0] * len(ranks)
    with File.Open(comm, "burst://res.dat", _rw()) as f:             # from the BFS now
        buf = bytearray(len(expected))
        f.Read_at(0, buf)
    assert bytes(buf) == expected
    comm.Barrier()
    if rank == size - 1:
        assert residency.prestage(path, tier=tier) == len(expected)
    comm.Barrier()
    held = _bytes_on_each_server(store, path)
    assert held[-1] == len(expected) and sum(held) == len(expected)  # staged by the last node, onto its server
    assert residency.frag_stat(path, tier=tier).clean == len(expected)
    comm.Barrier()


def test_h5py_parallel_file_on_the_cluster(ctier) -> None:
    """mpiburst.h5: every rank writes its rows; read back through the tier, synced, read by plain h5py."""
    import h5py

    from mpiburst import h5 as mh5

    comm, tier, store, node = ctier
    rank, size = comm.Get_rank(), comm.Get_size()
    shape = (6 * size, 1000)
    expected = (np.arange(shape[0] * shape[1]) * 0.5).reshape(shape)
    pf = mh5.parallel_create("burst://c.h5", comm, {"a": (shape, "f8")})
    rows = slice(rank * 6, rank * 6 + 6)
    pf.write("a", (rows,), expected[rows])
    pf.close()
    held = _bytes_on_each_server(store, bfs_file(tier, "c.h5"))
    _, ranks = _layout(size)
    assert all(n >= (hi - lo) * 6 * 1000 * 8 for n, (lo, hi) in zip(held, ranks))   # each node: its ranks' rows
    with mh5.File("burst://c.h5", "r", comm=comm) as f:
        np.testing.assert_array_equal(f["a"][()], expected)
    mpiburst.sync("burst://c.h5", comm=comm)
    if rank == 0:
        with h5py.File(bfs_file(tier, "c.h5"), "r") as f:
            np.testing.assert_array_equal(f["a"][()], expected)
    comm.Barrier()
