"""A small real Valkey/Redis cluster for tests of the cluster store: N cluster-mode servers on this host.

:func:`start_cluster` starts ``n`` servers with the run's hardening (a
0700 directory, 0600 config files holding only password hashes, ``user
default off``, the ranks' ACL user ``mpiburst`` with
:data:`mpiburst.server.config.USER_RULES`), gives server ``i`` the ``i``-th
of ``n`` equal slot ranges, joins them with ``CLUSTER MEET`` and waits for
``cluster_state:ok``. Forming the cluster takes ``CLUSTER`` rights, which the
ranks' user does not have: a separate test-only user does it. The servers
die with the process that started them.

Tests only: a run's servers are started by :mod:`mpiburst.server`.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..server.config import USER, USER_RULES, _acl_hash
from ..server.process import die_with_parent

#: The slots of a Redis Cluster.
SLOTS = 16384
#: The user that forms the cluster (tests only).
FORMER = "mpiburst-former"


@dataclass
class Cluster:
    """A running test cluster: ``clients[i]`` is an ordinary-user client of server ``i`` (node ``i``)."""

    procs: list[subprocess.Popen]
    ports: list[int]
    sockets: list[str]
    password: str
    former_password: str
    clients: list[redis.Redis] = field(default_factory=list)

    def failed(self, watcher: int, node: int) -> bool:
        """True once server ``watcher`` counts server ``node`` as failed (``CLUSTER NODES`` flag ``fail``)."""
        admin = redis.Redis(unix_socket_path=self.sockets[watcher], username=FORMER, password=self.former_password)
        try:
            lines = admin.execute_command("CLUSTER", "NODES").decode().splitlines()
        finally:
            admin.close()
        return any(f":{self.ports[node]}@" in line and "fail" in line.split()[2].split(",") for line in lines)

    def connect(self, i: int) -> redis.Redis:
        """Return a new ordinary-user client of server ``i`` (unix socket)."""
        return redis.Redis(unix_socket_path=self.sockets[i], username=USER, password=self.password,
                           socket_connect_timeout=10, retry=Retry(NoBackoff(), 0))   # as a run's clients

    def wipe(self) -> None:
        """Remove every key of every server, as the ordinary user (SCAN and UNLINK)."""
        for client in self.clients:
            keys = list(client.scan_iter(count=1000))
            if keys:
                client.unlink(*keys)

    def stop(self) -> None:
        """Kill every server and wait for it."""
        for client in self.clients:
            client.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=30)


def _free_port() -> int:
    """Return a TCP port free on 127.0.0.1 whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def start_cluster(directory: str, binary: str, n: int = 3, capacity: str = "256mb", node_timeout: int = 5000,
                  timeout: float = 30.0) -> Cluster:
    """Start ``n`` cluster-mode servers under ``directory`` and join them into one cluster (see the module docstring).

    As a run's servers: a node that stops answering for ``node_timeout`` ms
    counts as failed, and the others go on serving their own slots
    (``cluster-require-full-coverage no``).

    Raises
    ------
    RuntimeError
        If a server does not come up or the cluster does not reach ``cluster_state:ok`` within ``timeout``.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    password, former = secrets.token_hex(16), secrets.token_hex(16)
    procs: list[subprocess.Popen] = []
    ports: list[int] = []
    sockets: list[str] = []
    cluster = Cluster(procs, ports, sockets, password, former)
    try:
        for i in range(n):
            node_dir = os.path.join(directory, f"node{i}")
            os.makedirs(node_dir, mode=0o700, exist_ok=True)
            port = _free_port()
            sock = os.path.join(node_dir, "s")
            conf = os.path.join(node_dir, "server.conf")
            text = "\n".join([
                "bind 127.0.0.1", f"port {port}", "protected-mode yes", f'unixsocket "{sock}"', "unixsocketperm 700",
                f'dir "{node_dir}"', f'logfile "{os.path.join(node_dir, "server.log")}"', 'save ""',
                "appendonly no", f"maxmemory {capacity}", "maxmemory-policy noeviction",
                "cluster-enabled yes", 'cluster-config-file "nodes.conf"', f"cluster-node-timeout {node_timeout}",
                "cluster-require-full-coverage no", "cluster-allow-reads-when-down yes",
                "enable-protected-configs no", "enable-debug-command no", "enable-module-command no",
                "user default off", f"user {USER} on {_acl_hash(password)} {USER_RULES}",
                f"user {FORMER} on {_acl_hash(former)} ~* &* +@all", ""])
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            procs.append(subprocess.Popen([binary, conf], cwd=node_dir, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          preexec_fn=die_with_parent, umask=0o077))
            ports.append(port)
            sockets.append(sock)
        admins = [_wait_up(sock, former, proc, timeout) for sock, proc in zip(sockets, procs)]
        for i, admin in enumerate(admins):
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", i * SLOTS // n, (i + 1) * SLOTS // n - 1)
        for port in ports[1:]:
            admins[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        deadline = time.monotonic() + timeout
        while not all(b"cluster_state:ok" in a.execute_command("CLUSTER", "INFO") and
                      len(a.execute_command("CLUSTER", "NODES").splitlines()) == n for a in admins):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster of {n} servers did not reach cluster_state:ok in {timeout} s")
            time.sleep(0.05)
        for a in admins:
            a.close()
        cluster.clients = [cluster.connect(i) for i in range(n)]
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _wait_up(sock: str, former: str, proc: subprocess.Popen, timeout: float) -> redis.Redis:
    """Wait until the server on ``sock`` answers; return a client of the forming user."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"a test cluster server exited at start (status {proc.returncode})")
        if os.path.exists(sock):
            client = redis.Redis(unix_socket_path=sock, username=FORMER, password=former)
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                client.close()
        if time.monotonic() > deadline:
            raise RuntimeError("a test cluster server did not answer in time")
        time.sleep(0.02)
