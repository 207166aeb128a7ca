"""A multi-node run's servers on one machine: cluster-mode servers formed into one cluster (#15).

Real servers of the engine under test (``$MPIBURST_SERVER``; CI runs the suite
with Redis 7.0 and with Valkey 9.1), checked with plain redis-py clients, one
per node, as the ranks' user and as the admin user.
"""

from __future__ import annotations

import os
import signal
import stat

import pytest
import redis
from redis.crc import key_slot

from mpiburst import nodes, server
from mpiburst.errors import ConfigError, ServerError
from mpiburst.runconf import AdminCredentials, RunConf
from mpiburst.server import cluster

pytestmark = pytest.mark.timeout(120)

#: CLUSTER and MIGRATE forms the ranks' user must never run.
RANKS_REFUSED = [("CLUSTER", "INFO"), ("CLUSTER", "SLOTS"), ("CLUSTER", "NODES"), ("CLUSTER", "MEET", "127.0.0.1", "1"),
                 ("CLUSTER", "ADDSLOTSRANGE", "0", "1"), ("CLUSTER", "RESET"), ("CLUSTER", "FORGET", "x"),
                 ("CLUSTER", "SETSLOT", "1", "STABLE"), ("CLUSTER", "FAILOVER"),
                 ("MIGRATE", "127.0.0.1", "1", "k", "0", "1000")]
#: What even the admin user may not do to a formed cluster.
ADMIN_REFUSED = [("CLUSTER", "RESET"), ("CLUSTER", "FORGET", "x"), ("CLUSTER", "SETSLOT", "1", "STABLE"),
                 ("CLUSTER", "DELSLOTS", "1"), ("CLUSTER", "FAILOVER"), ("CLUSTER", "REPLICATE", "x"),
                 ("MIGRATE", "127.0.0.1", "1", "k", "0", "1000"), ("CONFIG", "SET", "cluster-enabled", "no")]


def _key_on(entry: dict) -> bytes:
    """Return a key whose hash tag maps into the node's slot range."""
    first, last = entry["slots"]
    return next(k for k in (f"{{n{i}}}x".encode() for i in range(1 << 20)) if first <= key_slot(k) <= last)


@pytest.fixture
def three(tmp_path, server_binary):
    """A run of three cluster-mode servers on this machine (6 channels), stopped at teardown."""
    conf = server.start_cluster(nodes=3, id="c3", dir=str(tmp_path), capacity="64M", channels=6,
                                server=server_binary)
    try:
        yield conf
    finally:
        if os.path.exists(conf.path):
            server.stop_run(conf)


def test_slot_ranges():
    assert server.slot_ranges(1) == [(0, 16383)]
    assert server.slot_ranges(3) == [(0, 5460), (5461, 10921), (10922, 16383)]
    ranges = server.slot_ranges(7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ConfigError, match="1 to 16384 nodes"):
        server.slot_ranges(0)


def test_three_servers_form_one_cluster(three, server_pids_in, tmp_path):
    conf = RunConf.load(three.path)
    assert [n["ranks"] for n in conf.nodes] == [[0, 2], [2, 4], [4, 6]]
    assert [tuple(n["slots"]) for n in conf.nodes] == server.slot_ranges(3)
    assert (conf.host, conf.port, conf.socket, conf.pid) == tuple(conf.nodes[0][k] for k in ("host", "port", "socket", "pid"))
    assert all(n["host"] == "127.0.0.1" for n in conf.nodes)  # every node here: loopback only, bus too
    assert len({n["pid"] for n in conf.nodes}) == 3 and sorted(server_pids_in(tmp_path)) == sorted(n["pid"] for n in conf.nodes)
    admin = AdminCredentials.load(conf)
    for k, entry in enumerate(conf.nodes):
        client = server.connect_redis(conf.node(k), admin=admin)
        info = client.execute_command("CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info and "cluster_known_nodes:3" in info and "cluster_slots_assigned:16384" in info
        client.close()
        # each node serves its own slots to the ranks' user and redirects the others
        user = server.connect_redis(conf.node(k))
        key = _key_on(entry)
        user.set(key, b"v%d" % k)
        assert user.get(key) == b"v%d" % k
        with pytest.raises(redis.exceptions.MovedError):
            user.set(_key_on(conf.nodes[(k + 1) % 3]), b"x")
        user.close()
    for name in os.listdir(tmp_path):
        path = tmp_path / name
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        else:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, name
    assert {f"nodes_c3@{k}.conf" for k in range(3)} <= set(os.listdir(tmp_path))
    config = (tmp_path / "redis_c3@1.conf").read_text()
    assert "cluster-enabled yes" in config and f"cluster-port {conf.nodes[1]['bus_port']}" in config
    assert "bind 127.0.0.1" in config and conf.password not in config


def test_ranks_user_runs_no_cluster_command_and_admin_cannot_reshape(three):
    user = server.connect_redis(three.node(1))
    admin = server.connect_redis(three.node(2), admin=True)
    try:
        for command in RANKS_REFUSED:
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)
        for command in ADMIN_REFUSED:
            with pytest.raises(redis.exceptions.NoPermissionError):
                admin.execute_command(*command)
    finally:
        user.close()
        admin.close()


def test_status_per_node_and_stop_with_one_node_dead(three, server_pids_in, tmp_path):
    info = server.status(three)
    assert info["up"] and [n["up"] for n in info["nodes"]] == [True] * 3
    assert info["used_memory"] == sum(n["used_memory"] for n in info["nodes"])
    os.kill(three.nodes[1]["pid"], signal.SIGKILL)
    assert not server.pid_alive(three.nodes[1]["pid"]) or server.process.wait_gone(three.nodes[1]["pid"], None, 10)
    info = server.status(three)
    assert not info["up"] and [n["up"] for n in info["nodes"]] == [True, False, True]
    assert info["nodes"][1]["used_memory"] is None
    report = server.stop_run(three)
    assert "3 servers" in report and "node 1 had already ended" in report
    assert server_pids_in(tmp_path) == [] and os.listdir(tmp_path) == []


def test_form_timeout_names_the_missing_node_and_leaves_nothing(tmp_path, server_binary, server_pids_in, monkeypatch):
    launch = cluster.launch_node

    def wrong_bus(*args, **kwargs):
        entry = launch(*args, **kwargs)
        if args[2] == 2:
            entry["bus_port"] = 1  # node 0 meets nobody there
        return entry

    monkeypatch.setattr(cluster, "launch_node", wrong_bus)
    monkeypatch.setattr(cluster, "FORM_TIMEOUT", 1.5)
    with pytest.raises(ServerError, match=r"did not form one cluster within 2 s \(node \d sees \d of 3 nodes, \d+ of 16384 slots"):
        server.start_cluster(nodes=3, id="c3", dir=str(tmp_path), capacity="64M", server=server_binary)
    assert server_pids_in(tmp_path) == [] and os.listdir(tmp_path) == []


def test_cluster_refuses_restart_and_port(tmp_path, server_binary):
    with pytest.raises(ConfigError, match="cannot restart run c2: no snapshot"):
        server.start_cluster(nodes=2, id="c2", dir=str(tmp_path), restart=True, server=server_binary)
    with pytest.raises(ConfigError, match="leave --port out"):
        server.start_cluster(nodes=2, id="c2", dir=str(tmp_path), port=7000, server=server_binary)
    assert os.listdir(tmp_path) == []


def test_conf_nodes_round_trip_and_bad_entry(three):
    conf = RunConf.load(three.path)
    assert conf.nodes == three.nodes and conf.node_count == 3
    view = conf.node(2)
    assert (view.port, view.pid, view.nodes) == (conf.nodes[2]["port"], conf.nodes[2]["pid"], [])
    with pytest.raises(ConfigError, match="cannot be saved"):
        view.save()
    data = dict(conf.__dict__, nodes=[dict(conf.nodes[0], ranks=[0])])
    with pytest.raises(ConfigError, match="wrong node entry"):
        RunConf.from_dict(data)


def test_ranks_per_node_setting(monkeypatch):
    monkeypatch.delenv(nodes.RANKS_PER_NODE, raising=False)
    assert nodes.ranks_per_node() is None
    monkeypatch.setenv(nodes.RANKS_PER_NODE, " 2 ")
    assert nodes.ranks_per_node() == 2
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(nodes.RANKS_PER_NODE, bad)
        with pytest.raises(ConfigError, match="MPIBURST_RANKS_PER_NODE=.* is not a whole number of at least 1"):
            nodes.ranks_per_node()
