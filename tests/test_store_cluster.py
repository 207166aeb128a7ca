"""The store contract suite on a real three-server cluster (mpiburst.store.cluster_store), and what only a cluster shows.

The servers are whatever ``server_binary`` gives (CI: Valkey 9 and Redis 7),
a run's cluster-mode servers joined into one cluster as a multi-node run
starts them (:func:`mpiburst.testing.cluster.start_cluster` over
:func:`mpiburst.server.start_cluster`), once per module.

* ``TestClusterStore``: the contract with this process on node 1 (not the
  home): every batch crosses to node 1's server, every record to node 0's.
* ``TestSpreadClusterStore``: the contract with each batch sent to the next
  node in turn, so every file's data is spread over the three servers and
  overlapping writes of different nodes must resolve in arrival order.
* Beside the contract: node-local placement, fences (a batch numbered before
  a flush began lands above its snapshot), the consistent cut under
  concurrent writers on several nodes, and errors naming a dead node's files.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mpiburst import flush
from mpiburst.errors import FlushError, NodeLostError, TierConnectionError
from mpiburst.store import Store, file_id
from mpiburst.store.cluster_store import ClusterStore
from mpiburst.testing import Model, put
from mpiburst.testing.cluster import Cluster, start_cluster
from mpiburst.testing.store import FullStoreTests, StoreTests, current, wait_for
from mpiburst.tier import Tier

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, server_binary: str) -> Iterator[Cluster]:
    """Three cluster-mode servers joined into one cluster, for the whole module."""
    started = start_cluster(str(tmp_path_factory.mktemp("cluster")), server_binary, 3)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory, server_binary: str) -> Iterator[Cluster]:
    """Three servers of 8 MiB each (a full tier)."""
    started = start_cluster(str(tmp_path_factory.mktemp("small")), server_binary, 3, capacity="8M")
    try:
        yield started
    finally:
        started.stop()


class SpreadClusterStore(ClusterStore):
    """A cluster store whose batches go to each node in turn (one process playing every node's ranks)."""

    turn = 0

    def _writer_node(self) -> int:
        self.turn += 1
        return self.turn % self.nodes


class TestClusterStore(StoreTests, FullStoreTests):
    """The contract on the cluster, writing from node 1."""

    placed = True

    @pytest.fixture
    def store(self, cluster: Cluster) -> Iterator[Store]:
        cluster.wipe()
        yield ClusterStore(cluster.clients, local=1)

    @pytest.fixture
    def reopen(self, cluster: Cluster) -> Callable[[], Store]:
        return lambda: ClusterStore([cluster.connect(i) for i in range(len(cluster.clients))], local=1)   # new connections

    @pytest.fixture
    def small_store(self, small_cluster: Cluster) -> Iterator[Store]:
        small_cluster.wipe()
        yield ClusterStore(small_cluster.clients, local=1)


class TestSpreadClusterStore(StoreTests):
    """The contract on the cluster, each batch to the next node."""

    placed = True

    @pytest.fixture
    def store(self, cluster: Cluster) -> Iterator[Store]:
        cluster.wipe()
        yield SpreadClusterStore(cluster.clients, local=None)

    @pytest.fixture
    def reopen(self, cluster: Cluster) -> Callable[[], Store]:
        return lambda: ClusterStore([cluster.connect(i) for i in range(len(cluster.clients))], local=0)


def _keys_of(cluster: Cluster, node: int, path: str) -> list[bytes]:
    """The keys of ``path``'s data on server ``node`` (its payloads: ``...:{fid}:b:<n>``)."""
    return [k for k in cluster.clients[node].scan_iter(match=f"*{{{file_id(path)}}}:b:*", count=1000)]


def test_each_node_keeps_its_own_ranks_bytes(cluster: Cluster) -> None:
    """A shared file written from three nodes: each server holds exactly the bytes its node wrote."""
    cluster.wipe()
    stores = [ClusterStore(cluster.clients, local=i) for i in range(3)]
    path = "/bfs/shared.dat"
    stores[2].create(path, None)
    model = Model()
    for i, store in enumerate(stores):
        put(store, path, model, [(i * 1000, bytes([65 + i]) * 1000)])
    for i in range(3):
        keys = _keys_of(cluster, i, path)
        assert len(keys) == 1 and cluster.clients[i].get(keys[0]) == bytes([65 + i]) * 1000
    for store in stores:
        assert current(store, path, 0, 3000) == bytes(model.data)
    assert stores[0].home.r is cluster.clients[0]
    record = cluster.clients[0].hgetall(stores[0].home.keys.file(file_id(path), "m"))
    assert {k for k in record if k.startswith(b"@")} == {b"@0", b"@1", b"@2"}


def test_overlapping_writes_of_different_nodes_resolve_in_arrival_order(cluster: Cluster) -> None:
    cluster.wipe()
    stores = [ClusterStore(cluster.clients, local=i) for i in range(3)]
    path = "/bfs/overlap.dat"
    stores[0].create(path, None)
    model = Model()
    for step, i in enumerate([2, 0, 1, 2, 1, 0]):            # each write issued after the last one completed
        put(stores[i], path, model, [(step * 100, bytes([97 + step]) * 700)])
    seqs = [e.seq for e in stores[1].all_extents(path)]
    assert sorted(seqs) == list(range(1, 7))
    assert current(stores[1], path, 0, 1200) == bytes(model.data)


def test_a_batch_numbered_before_a_flush_began_lands_above_its_snapshot(cluster: Cluster) -> None:
    """The fence: numbers taken before ``begin`` but indexed after it are refused and taken anew.

    Without the fence the batch would land with a number at or below the
    snapshot after the flush read the index, and mark_clean would call it clean.
    """
    cluster.wipe()
    store = ClusterStore(cluster.clients, local=2)
    path = "/bfs/fence.dat"
    store.create(path, None)
    put(store, path, None, [(0, b"a" * 10)])
    lease = store.flush_lease(path, 30)
    assert lease is not None
    begun = []

    class Overtaken(ClusterStore):
        """Runs the flush's begin between numbering the first batch and indexing it."""

        def _number(self, *args: object) -> int:
            base = super()._number(*args)  # type: ignore[arg-type]
            if not begun:
                begun.append(lease.begin())
            return base

    late = Overtaken(cluster.clients, local=2)
    first = put(late, path, None, [(5, b"b" * 10)])
    snap = begun[0]
    assert snap.pending == 2 and first > snap.pending         # numbered anew, above the snapshot
    assert all(e.seq <= snap.pending for e in store.extents(path, 0, 100, upto=snap.pending))
    assert lease.mark_clean(snap.pending, None)
    assert store.meta(path).dirty                              # the late batch is not called clean
    assert current(store, path, 0, 15) == b"aaaaa" + b"b" * 10


def test_a_node_s_first_batch_numbered_before_a_flush_began_lands_above_its_snapshot(cluster: Cluster) -> None:
    """The fence also holds for a node that has no record of the file yet: its first batch, numbered
    before ``begin`` and indexed after, is numbered anew (else the flush, which read that node's empty
    index, would mark it clean unwritten)."""
    cluster.wipe()
    store = ClusterStore(cluster.clients, local=0)
    path = "/bfs/first-fence.dat"
    store.create(path, None)
    put(store, path, None, [(0, b"a" * 10)])
    lease = store.flush_lease(path, 30)
    assert lease is not None
    begun: list = []
    seen: list = []

    class Overtaken(ClusterStore):
        """Runs the flush's begin, and its read of the index, between numbering node 2's first batch and indexing it."""

        def _number(self, *args: object) -> int:
            base = super()._number(*args)  # type: ignore[arg-type]
            if not begun:
                begun.append(lease.begin())
                seen.extend(store.extents(path, 0, 100, upto=begun[0].pending))
            return base

    first = put(Overtaken(cluster.clients, local=2), path, None, [(5, b"b" * 10)])
    snap = begun[0]
    assert first > snap.pending                                 # numbered anew, above the snapshot
    assert store.extents(path, 0, 100, upto=snap.pending) == seen   # the flush read all there is of it
    assert lease.mark_clean(snap.pending, None)
    assert store.meta(path).dirty                               # the late batch is not called clean
    assert current(store, path, 0, 15) == b"aaaaa" + b"b" * 10


def test_the_cut_is_consistent_under_writers_on_several_nodes(cluster: Cluster) -> None:
    """Writers on nodes 1 and 2 write X then Y, step after step; any cut holding Y's step k holds X's step k."""
    cluster.wipe()
    reader = ClusterStore(cluster.clients, local=0)
    for name in ("x", "y"):
        reader.create(f"/bfs/{name}", None)
    seqs: dict[tuple[str, int], int] = {}

    def writer(node: int) -> None:
        store = ClusterStore(cluster.clients[:], local=node)
        for k in range(node - 1, 200, 2):
            seqs["x", k] = put(store, "/bfs/x", None, [(k * 8, b"x" * 8)])
            seqs["y", k] = put(store, "/bfs/y", None, [(k * 8, b"y" * 8)])

    cuts = []
    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    while not all(not t.is_alive() for t in threads):
        cuts.append(reader.cut())
    for t in threads:
        t.join()
    assert len(cuts) > 3
    for cut in cuts:
        for k in range(200):
            if seqs["y", k] <= cut["/bfs/y"].seq:
                assert seqs["x", k] <= cut["/bfs/x"].seq, (k, cut)


def test_a_dead_node_is_named_with_the_files_it_held(tmp_path: Path, server_binary: str) -> None:
    """Node 2 dies: reads and flushes of the file it held part of name node 2 and that file, and mark nothing
    clean; a file held on other nodes stays readable and flushable."""
    dead = start_cluster(str(tmp_path), server_binary, 3)
    try:
        stores = [ClusterStore(dead.clients, local=i) for i in range(3)]
        bfs = tmp_path / "bfs"
        bfs.mkdir()
        spread, safe = str(bfs / "spread"), str(bfs / "safe")
        stores[0].create(spread, None)
        stores[0].create(safe, None)
        put(stores[0], spread, None, [(0, b"0" * 100)])
        put(stores[2], spread, None, [(100, b"2" * 100)])
        put(stores[1], safe, None, [(0, b"1" * 100)])
        dead.kill(2)
        assert wait_for(lambda: dead.failed(0, 2) and dead.failed(1, 2), timeout=30)   # the others know it now
        with pytest.raises(NodeLostError, match=rf"node 2 .*it held data of {spread}; check") as lost:
            current(stores[0], spread, 0, 200)
        assert lost.value.node == 2 and lost.value.files == (spread,)
        assert current(stores[0], safe, 0, 100) == b"1" * 100
        with pytest.raises(TierConnectionError, match="node 2"):
            put(stores[2], safe, None, [(0, b"x")])
        assert stores[0].meta(safe).seq == 3                          # the refused batch took no number
        tier = Tier(dataclasses.replace(dead.conf, bfs_root=str(bfs)), stores[0], dead.clients[0])
        with pytest.raises(FlushError, match=f"node 2 holding data of {spread} was lost"):
            flush.sync(spread, tier=tier)
        meta = stores[0].meta(spread)
        assert meta.clean == 0 and meta.dirty and not stores[0].leased(spread) and not os.path.exists(spread)
        assert flush.sync(safe, tier=tier).size == 100 and open(safe, "rb").read() == b"1" * 100
        assert not stores[0].meta(safe).dirty
        tier.disconnect()
    finally:
        dead.stop()


def test_commits_under_a_writer_spanning_two_nodes_are_consistent_cuts(cluster: Cluster, tmp_path: Path) -> None:
    """flush.commit on the cluster: a writer puts checkpoint k through node 1, then ``latest = k`` through node 2;
    after every commit taken meanwhile, the checkpoint the BFS's ``latest`` names is whole on the BFS."""
    cluster.wipe()
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    on = [ClusterStore(cluster.clients, local=i) for i in range(3)]
    tier = Tier(dataclasses.replace(cluster.conf, bfs_root=str(bfs), align=64 << 10), on[0], cluster.clients[0])
    latest = str(bfs / "latest")
    on[2].create(latest, None)
    done, started = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            started.wait(30)
            for k in range(1, 400):
                ckpt = str(bfs / f"ckpt_{k:04d}")
                on[1].create(ckpt, None)
                put(on[1], ckpt, None, [(0, bytes([k % 251]) * 150_000)])
                put(on[2], latest, None, [(0, k.to_bytes(8, "little"))])
                if done.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    commits = 0
    seen: list[int] = []
    try:
        while not done.is_set() or commits < 3:
            started.set()
            flush.commit(tier=tier)
            commits += 1
            k = int.from_bytes(open(latest, "rb").read(), "little") if os.path.exists(latest) else 0
            if k:
                seen.append(k)
                assert open(bfs / f"ckpt_{k:04d}", "rb").read() == bytes([k % 251]) * 150_000, k
            if commits >= 12:
                done.set()
    finally:
        done.set()
        thread.join(timeout=60)
    assert not failures and commits >= 3 and len(set(seen)) >= 2, seen     # commits landed while it wrote
    tier.disconnect()


def test_a_store_made_while_a_node_is_down_names_it(tmp_path: Path, server_binary: str) -> None:
    """Making a store asks each server for its tag: with node 1 down that fails naming node 1 (not a crash)."""
    dead = start_cluster(str(tmp_path), server_binary, 3, run_id="down")
    try:
        dead.kill(1)
        with pytest.raises(NodeLostError, match="node 1 "):
            ClusterStore(dead.clients, local=0)
    finally:
        dead.stop()


def test_extents_from_pages_through_ties_spread_over_nodes(cluster: Cluster) -> None:
    """Many extents start at the same offsets on different nodes: every page is the next ``count`` in order."""
    cluster.wipe()
    store = SpreadClusterStore(cluster.clients, local=None)
    path = "/bfs/ties.dat"
    store.create(path, None)
    for k in range(30):
        put(store, path, None, [(10 * (k % 3), bytes([k]) * 5)])
    every = list(store.all_extents(path))
    assert len(every) == 30 and {e.blob % 3 for e in every} == {0, 1, 2}
    for count in range(1, 8):
        for start in (0, 1, 10, 11, 20, 21):
            assert store.extents_from(path, start, count) == [e for e in every if e.start >= start][:count]
