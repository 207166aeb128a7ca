"""The cluster store of a run with ``replicas=1`` on real servers: what ``confirm`` promises (#23).

One run of three cluster-mode servers, each with its replica on the next
node, started in this process (``server.start_cluster``). The store's
``confirm`` is what ``Sync``, ``Close`` and ``mem_io_store`` call; the
whole-run test (six ranks, a node killed after ``Close``) is
``tests/test_cluster_replicas_mpi.py``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from mpiburst import server
from mpiburst.errors import NodeLostError, ReplicaError
from mpiburst.runconf import RunConf
from mpiburst.server import connection
from mpiburst.server.connection import connect_store
from mpiburst.server.process import wait_gone
from mpiburst.store import Store
from mpiburst.store.cluster_store import COUNTER_GAP, ClusterStore
from mpiburst.testing.cluster import Cluster
from mpiburst.testing.store import StoreTests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, server_binary: str) -> Iterator[RunConf]:
    """A run of 3 nodes with a replica each (a ring), stopped after the tests.

    Shared, to start it once: the store contract runs first, then one test kills node 1's replica, the next node
    0's server (whose replica runs on node 1, beside the first one), the next stops node 2's.
    """
    conf = server.start_cluster(nodes=3, id="rp", dir=str(tmp_path_factory.mktemp("rp")), capacity="64M", channels=3,
                                server=server_binary, tied=True, replicas=1)
    try:
        yield conf
    finally:
        server.stop_run(conf)


@pytest.fixture(scope="module")
def replicated_cluster(replicated: RunConf) -> Iterator[Cluster]:
    """The run of :func:`replicated` with a client per node, for the store contract (before any server is killed)."""
    cluster = Cluster(replicated)
    cluster.clients = [cluster.connect(i) for i in range(3)]
    yield cluster
    for client in cluster.clients:
        client.close()


class ConfirmingClusterStore(ClusterStore):
    """A cluster store with replicas that waits for the replica after every batch, as ``Sync`` after each write."""

    def commit(self, *args, **kwargs) -> int:  # noqa: ANN002, ANN003
        first = super().commit(*args, **kwargs)
        self.confirm()
        return first


class TestReplicatedClusterStore(StoreTests):
    """The store contract on a cluster whose nodes have replicas, every batch confirmed on two servers."""

    placed = True

    @pytest.fixture
    def store(self, replicated_cluster: Cluster) -> Iterator[Store]:
        replicated_cluster.wipe()
        store = ConfirmingClusterStore(replicated_cluster.clients, local=1,
                                       replicas=replicated_cluster.replica_clients())
        yield store
        store.confirm()   # what else the test wrote reached the replicas too: each holds its primary's keys
        assert [r.dbsize() for r in store.replicas if r] == [c.dbsize() for c in replicated_cluster.clients]

    @pytest.fixture
    def reopen(self, replicated_cluster: Cluster) -> Callable[[], Store]:
        return lambda: ClusterStore([replicated_cluster.connect(i) for i in range(3)], local=1,
                                    replicas=replicated_cluster.replica_clients())   # new connections


def _store(conf: RunConf, node: int) -> ClusterStore:
    store, _ = connect_store(conf, node)
    assert isinstance(store, ClusterStore)
    return store


def _write(store: ClusterStore, path: str, offset: int, data: bytes) -> None:
    store.commit(path, 0, data, [(offset, 0, len(data))])


def test_confirm_waits_for_the_replica_and_says_when_it_cannot(replicated: RunConf):
    conf = replicated
    assert [conf.replica(k) is not None for k in range(3)] == [True] * 3
    store = _store(conf, 1)
    try:
        store.create("/a", None)
        _write(store, "/a", 0, b"x" * 4096)
        store.confirm()   # on node 1 and on its replica (on node 2)
        replica = server.connect_redis(conf.replica(1))
        try:
            assert replica.info("replication")["role"] == "slave"
            assert replica.dbsize() > 0   # the batch's keys came over
        finally:
            replica.close()
        assert [n["replica"] for n in server.status(conf)["nodes"]] == ["linked"] * 3
        os.kill(conf.nodes[1]["replica"]["pid"], signal.SIGKILL)
        assert wait_gone(conf.nodes[1]["replica"]["pid"], conf.server, 10)
        assert [n["replica"] for n in server.status(conf)["nodes"]] == ["linked", "down", "linked"]
        _write(store, "/a", 4096, b"y" * 4096)
        t0 = time.monotonic()
        with pytest.raises(ReplicaError, match="replica of node 1"):
            store.confirm(timeout=0.5)
        assert time.monotonic() - t0 < 5   # bounded
    finally:
        store.close()


def _stall_replication(conf: RunConf, store: ClusterStore, node: int) -> None:
    """Stop ``node``'s replica and queue 24 MiB for it on its primary: past the socket buffers (at most 4 MiB each
    way here), so what the primary is written next stays in its own memory until the replica reads again."""
    os.kill(conf.nodes[node]["replica"]["pid"], signal.SIGSTOP)
    store.clients[node].set(f"mpb:{{{store.tags[node]}}}:filler", b"f" * (24 << 20))


def test_node_0_lost_its_replica_serves_and_an_unconfirmed_write_is_sent_again(replicated: RunConf):
    conf = replicated
    store = _store(conf, 0)
    try:
        store.create("/b", None)
        _write(store, "/b", 0, b"a" * 4096)
        store.confirm()
        _stall_replication(conf, store, 0)
        try:
            _write(store, "/b", 4096, b"b" * 4096)   # pushed, not confirmed: it never reaches the replica
            _write(store, "/b", 6144, b"c" * 2048)   # a later write over part of it wins, before and after
            first = [p.base for p in store.pushed]
            assert len(first) == 2 and max(first) < COUNTER_GAP
            os.kill(conf.nodes[0]["pid"], signal.SIGKILL)
            assert wait_gone(conf.nodes[0]["pid"], conf.server, 10)
        finally:
            os.kill(conf.nodes[0]["replica"]["pid"], signal.SIGCONT)
        out = bytearray(8192)
        meta, extents = store.window("/b", 0, 8192)   # waits for the cluster to promote node 0's replica
        assert store.failed_over == {0}
        again = [p.base for p in store.pushed]   # it lacked both: sent again, numbered anew, in order
        assert len(again) == 2 and COUNTER_GAP < again[0] < again[1]
        assert meta is not None and store.fetch_into("/b", extents, 0, memoryview(out))
        assert bytes(out) == b"a" * 4096 + b"b" * 2048 + b"c" * 2048 and meta.size == 8192
        state = server.status(conf)   # node 0's server is gone, its replica serves it: the run is up
        assert state["up"] and state["nodes"][0]["up"] and state["nodes"][0]["replica"] == "serving"
        store.confirm()   # nothing lost, nothing to say
        assert store.pushed == []
        other = _store(conf, 2)   # another process: numbers past any the lost home may have handed out
        try:
            _write(other, "/b", 8192, b"c" * 4096)
            assert other.failed_over == {0} and other.meta("/b").seq > COUNTER_GAP
        finally:
            other.close()
    finally:
        store.close()


def test_a_stopped_server_is_replaced_by_its_replica_and_serves_no_write_again(replicated: RunConf,
                                                                              monkeypatch: pytest.MonkeyPatch):
    # three primaries left (node 0's promoted replica, nodes 1 and 2): node 2 SIGSTOPped, the others promote its
    # replica; a rank waiting on the stopped server gives up after the reply timeout and goes on with the replica
    monkeypatch.setattr(connection, "REPLICATED_REPLY_TIMEOUT", 2.0)
    conf = replicated
    store = _store(conf, 2)
    pid = conf.nodes[2]["pid"]
    try:
        store.create("/d", None)
        _write(store, "/d", 0, b"d" * 4096)
        store.confirm()
        os.kill(pid, signal.SIGSTOP)
        try:
            out = bytearray(4096)
            meta, extents = store.window("/d", 0, 4096)
            assert meta is not None and store.fetch_into("/d", extents, 0, memoryview(out)) and bytes(out) == b"d" * 4096
            assert 2 in store.failed_over
            _write(store, "/d", 4096, b"e" * 4096)
            store.confirm()
        finally:
            os.kill(pid, signal.SIGCONT)
        old = server.connect_redis(conf.node(2))   # resumed, it learns of the newer configuration: a replica now
        try:
            deadline = time.monotonic() + 30
            while old.info("replication")["role"] != "slave":
                assert time.monotonic() < deadline, "the stopped server came back as a second primary"
                time.sleep(0.2)
            with pytest.raises(redis.ResponseError) as moved:
                old.set(store.shards[2].keys.stats, 1)   # no write lands there any more
            assert isinstance(moved.value, redis.exceptions.AskError) or str(moved.value).startswith("MOVED ")
        finally:
            old.close()
        fresh = _store(conf, 2)   # a process that connects now reaches the old server, which answers MOVED
        try:
            _write(fresh, "/d", 8192, b"f" * 4096)   # taken as a failover: written to the promoted replica
            assert 2 in fresh.failed_over
        finally:
            fresh.close()
        assert store.window("/d", 0, 12288)[0].size == 12288
    finally:
        store.close()


def test_two_nodes_a_dead_server_s_replica_is_promoted_by_mpiburst_a_stopped_one_s_never_and_the_run_saves_whole(
        tmp_path: Path, server_binary: str):
    # two primaries: no majority, the cluster promotes nothing; the store does (CLUSTER FAILOVER TAKEOVER), but
    # only for a server whose port refuses connections, never for one that is only stopped. Then the run is saved,
    # node 1 from its promoted replica, and restarted from the snapshots with every byte.
    conf = server.start_cluster(nodes=2, id="two", dir=str(tmp_path), capacity="64M", channels=2,
                                server=server_binary, tied=True, replicas=1)
    writer, reader = _store(conf, 1), _store(conf, 0)
    try:
        writer.create("/c", None)
        _write(writer, "/c", 0, b"w" * 4096)
        writer.confirm()
        pid = conf.nodes[1]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            assert not reader._dead(1)   # stopped: its port still takes connections
        finally:
            os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, conf.server, 10)
        t0 = time.monotonic()
        out = bytearray(4096)
        meta, extents = reader.window("/c", 0, 4096)
        assert meta is not None and reader.fetch_into("/c", extents, 0, memoryview(out)) and bytes(out) == b"w" * 4096
        assert reader.failed_over == {1} and time.monotonic() - t0 < 10   # no node timeout to wait for
        _write(writer, "/c", 4096, b"v" * 4096)   # node 1's ranks write on, to the promoted replica
        writer.confirm()
        assert writer.failed_over == {1} and reader.window("/c", 0, 8192)[0].size == 8192
    finally:
        writer.close()
        reader.close()
    assert "snapshot saved" in server.stop_run(conf, save=True)   # node 1's own server is gone: from its replica
    again = server.start_cluster(nodes=2, id="two", dir=str(tmp_path), restart=True, capacity="64M", channels=2,
                                 server=server_binary, tied=True, replicas=1)
    try:
        store = _store(again, 0)
        try:
            meta, extents = store.window("/c", 0, 8192)
            out = bytearray(8192)
            assert meta is not None and meta.size == 8192 and store.fetch_into("/c", extents, 0, memoryview(out))
            assert bytes(out) == b"w" * 4096 + b"v" * 4096
        finally:
            store.close()
        assert [n["replica"] for n in server.status(again)["nodes"]] == ["linked"] * 2
    finally:
        server.stop_run(again, discard=True)
