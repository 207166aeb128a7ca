"""Tier.start on a communicator spanning several nodes: one server per node, one cluster (#15).

``tests/run.sh`` runs this file under ``mpiexec -n 2`` and ``-n 4`` and once
more with ``-n 6`` and ``MPIBURST_RANKS_PER_NODE=2`` (three nodes of two
ranks). When the variable is not set, these tests set it to 1 (every rank
a node), so every run starts a real cluster of real servers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis

from mpiburst import nodes, server
from mpiburst.errors import ServerError
from mpiburst.runconf import RunConf
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]


@pytest.fixture
def per_node(monkeypatch) -> int:
    """The ranks per simulated node: ``$MPIBURST_RANKS_PER_NODE``, else 1 (set for the test)."""
    if not os.environ.get(nodes.RANKS_PER_NODE):
        monkeypatch.setenv(nodes.RANKS_PER_NODE, "1")
    return int(os.environ[nodes.RANKS_PER_NODE])


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_one_server_per_node_started_by_its_first_rank(mpi_tmp_path: Path, server_binary: str, per_node: int):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    count = -(-size // per_node)
    bfs = mpi_tmp_path / "bfs"
    if rank == 0:
        bfs.mkdir()
    comm.Barrier()
    tier = Tier.start(comm, id="ct", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="64M", server=server_binary)
    with tier:
        conf = tier.conf
        node = rank // per_node
        assert len(conf.nodes) == count and conf.channels == size
        assert [tuple(n["ranks"]) for n in conf.nodes] == [(lo, min(lo + per_node, size)) for lo in range(0, size, per_node)]
        assert [tuple(n["slots"]) for n in conf.nodes] == server.slot_ranges(count)
        assert tier.store.local == node and tier.store.nodes == count
        if rank == conf.nodes[node]["ranks"][0]:  # the node's first rank started (and is the parent of) its server
            assert _parent(conf.nodes[node]["pid"]) == os.getpid()
        assert RunConf.load(conf.path).nodes == conf.nodes  # rank 0 wrote what every rank got
        addresses = comm.allgather(os.environ.get("MPIBURST_NODE_ADDRESS"))
        one_host = len(set(comm.allgather(socket.gethostname()))) == 1
        if rank == 0:
            state = server.status(conf)   # from host 1 of simulated hosts: the others' servers over TCP
            assert state["up"] and [n["up"] for n in state["nodes"]] == [True] * count
            if one_host:
                assert all(n["host"] == "127.0.0.1" for n in conf.nodes)  # every node is this host: loopback only
            else:   # separate hosts (tests/netns.py): each node listens on its own host's address
                assert [n["host"] for n in conf.nodes] == [addresses[n["ranks"][0]] for n in conf.nodes]
            assert conf.tls == (os.environ.get("MPIBURST_TRUST_NETWORK") != "1")
        # the raw client is this node's server, which serves this node's slots and redirects the others
        key = next(k for k in (f"{{r{i}}}".encode() for i in range(1 << 20))
                   if conf.nodes[node]["slots"][0] <= redis.crc.key_slot(k) <= conf.nodes[node]["slots"][1])
        tier.redis.set(key + b"%d" % rank, b"x")
        comm.Barrier()
    comm.Barrier()
    pids = [n["pid"] for n in conf.nodes]
    assert not [p for p in pids if server.pid_alive(p, conf.server)], [open(f"/proc/{p}/status").read()[:300] for p in pids
                                                                       if server.pid_alive(p, conf.server)]
    if rank == 0:
        assert not os.path.exists(conf.path)
        assert sorted(os.listdir(mpi_tmp_path)) == ["bfs"]


def test_a_node_that_cannot_start_fails_every_rank_and_leaves_nothing(mpi_tmp_path: Path, server_binary: str,
                                                                      per_node: int, monkeypatch):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    last_leader = (-(-size // per_node) - 1) * per_node
    if rank == last_leader:
        def broken(*args, **kwargs):
            raise ServerError(f"the server of node {rank // per_node} would not start (test)")
        monkeypatch.setattr(server, "launch_planned_node", broken)
    with pytest.raises(ServerError, match=f"node {last_leader // per_node} would not start"):
        Tier.start(comm, id="cf", dir=str(mpi_tmp_path), capacity="64M", server=server_binary)
    comm.Barrier()
    if rank == 0:
        assert os.listdir(mpi_tmp_path) == []  # no conf, no admin file, no node's files
    for pid in _server_children():
        pytest.fail(f"server {pid} left running after a failed start")


def _server_children() -> list[int]:
    """Return live server processes whose parent is this process."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _parent(int(entry)) == os.getpid() and server.pid_alive(int(entry)):
                    with open(f"/proc/{entry}/comm", encoding="ascii") as f:
                        name = f.read()
                    if "server" in name or "redis" in name:
                        found.append(int(entry))
            except (OSError, IndexError):
                pass
    return found


def test_hosts_and_layout(per_node: int, monkeypatch):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node, ranges = nodes.layout(comm)
    assert ranges[node][0] <= comm.Get_rank() < ranges[node][1]
    assert ranges[0][0] == 0 and ranges[-1][1] == comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    if not os.environ.get("MPIBURST_TEST_NETNS"):
        assert len(set(hosts)) == 1  # these tests run on one machine
        return
    # simulated hosts (tests/netns.py, per_node ranks on each): a node is a host, and the ranks' shared
    # memory groups (Split_type, without the variable) find the same nodes
    assert [hosts[lo] for lo, _ in ranges] == [f"h{k + 1}" for k in range(len(ranges))]
    assert all(hosts[r] == hosts[lo] for lo, hi in ranges for r in range(lo, hi))
    monkeypatch.delenv(nodes.RANKS_PER_NODE)
    assert nodes.layout(comm) == (node, ranges)
