"""A real Valkey/Redis cluster for tests of the cluster store: a run of N cluster-mode servers on this host.

:func:`start_cluster` starts a run's servers the way a multi-node run does
(:func:`mpiburst.server.start_cluster`: hardened configs, ACLs, the cluster
formed and ``cluster_state:ok``) and hands out one ordinary-user client per
node (:func:`mpiburst.server.connect_redis` of the node's view, as a rank
connects). :class:`Cluster` adds what tests need: wiping every server,
killing one, asking whether the others count it as failed.

Tests only: a run's servers are started by :mod:`mpiburst.server`.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import redis

from .. import server
from ..runconf import AdminCredentials, RunConf
from ..server.process import wait_gone


@dataclass
class Cluster:
    """A running test cluster: ``clients[i]`` is an ordinary-user client of node ``i``'s server."""

    conf: RunConf
    clients: list[redis.Redis] = field(default_factory=list)

    @property
    def ranks(self) -> list[tuple[int, int]]:
        """Each node's ``[lo, hi)`` of ranks (channels)."""
        return [(e["ranks"][0], e["ranks"][1]) for e in self.conf.nodes]

    def connect(self, i: int) -> redis.Redis:
        """Return a new ordinary-user client of node ``i``'s server."""
        return server.connect_redis(self.conf.node(i))

    def replica_clients(self) -> list[redis.Redis | None]:
        """Return a new ordinary-user client of each node's replica server (None for a node without one)."""
        return [server.connect_redis(view) if view else None for view in map(self.conf.replica, range(len(self.clients)))]

    def wipe(self) -> None:
        """Remove every key of every server, as the ordinary user (SCAN and UNLINK)."""
        for client in self.clients:
            keys = list(client.scan_iter(count=1000))
            if keys:
                client.unlink(*keys)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``'s server and wait until it is gone."""
        pid = self.conf.nodes[i]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, None, 30.0)

    def failed(self, watcher: int, node: int) -> bool:
        """True once node ``watcher``'s server counts node ``node``'s as failed (``CLUSTER NODES`` flag ``fail``)."""
        admin = server.connect_redis(self.conf.node(watcher), admin=AdminCredentials.load(self.conf))
        try:
            lines = admin.execute_command("CLUSTER", "NODES").decode().splitlines()
        finally:
            admin.close()
        port = self.conf.nodes[node]["port"]
        return any(f":{port}@" in line and "fail" in line.split()[2].split(",") for line in lines)

    def stop(self) -> None:
        """Close the clients and stop every server (one already killed is fine)."""
        for client in self.clients:
            client.close()
        if os.path.exists(self.conf.path):
            server.stop_run(self.conf)


def start_cluster(directory: str, binary: str, n: int = 3, capacity: str = "256M", channels: int | None = None,
                  run_id: str = "cl") -> Cluster:
    """Start a run of ``n`` cluster-mode servers in ``directory`` (node ``k`` serves an even share of ``channels``).

    Raises
    ------
    MpiburstError
        As :func:`mpiburst.server.start_cluster`; no server is left running.
    """
    conf = server.start_cluster(nodes=n, id=run_id, dir=directory, capacity=capacity, channels=channels or n,
                                server=binary, tied=True)
    cluster = Cluster(conf)
    try:
        cluster.clients = [cluster.connect(i) for i in range(n)]
    except BaseException:
        cluster.stop()
        raise
    return cluster
