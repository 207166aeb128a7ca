"""A run over several nodes: one cluster-mode server per node, joined into one Redis / Valkey cluster.

Each node's first rank starts its node's server with :func:`launch_node`
(the same hardening as a plain run's: umask 077, 0600 config with password
hashes only, ACL users, a private socket directory, an authenticated PING
before it counts as started, tied to the starting process); the process that
starts the run then joins them with :func:`form`: node ``k`` takes the
``k``-th of ``n`` even slot ranges (``CLUSTER ADDSLOTSRANGE``, Redis >= 7.0,
Valkey >= 7.2), node 0 meets every other node (``CLUSTER MEET`` with the
node's cluster bus port), and the wait ends once every node sees ``n`` nodes,
all 16384 slots assigned and ``cluster_state:ok``, or after
:data:`FORM_TIMEOUT` with an error naming the node that is not there yet.

Only the admin user may form the cluster; the ranks' user can run no CLUSTER
command. The cluster bus (``cluster_port``) is not authenticated by Redis or
Valkey: it binds where the server binds, loopback when every node is this
host (see :mod:`.config`).

Single-process helpers for tests and tools: :func:`mpiburst.server.start_cluster`
starts ``n`` nodes on this machine and forms them (see :mod:`.lifecycle`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import redis

from ..errors import ConfigError, ServerError
from ..runconf import (
    AdminCredentials,
    RunConf,
    cluster_conf_name,
    create_private,
    log_name,
    node_entry_path,
    node_member,
    rdb_name,
    replica_member,
    server_conf_path,
    socket_dir_path,
)
from .connection import connect_redis
from .discovery import free_port
from .launch import MAX_SOCKET_PATH, SOCKET_NAME, PortInUse, launch, make_socket_dir, remove_file
from .process import kill, pid_alive, wait_gone
from .tls import TlsFiles

#: Hash slots of a Redis / Valkey cluster.
SLOTS = 16384
#: How long forming the cluster may take before it counts as failed.
FORM_TIMEOUT = 30.0
PORT_ATTEMPTS = 5


def slot_ranges(count: int) -> list[tuple[int, int]]:
    """Return ``count`` even, contiguous slot ranges ``(first, last)`` (inclusive) covering all :data:`SLOTS`."""
    if not 1 <= count <= SLOTS:
        raise ConfigError(f"a cluster has 1 to {SLOTS} nodes, not {count}.")
    bounds = [k * SLOTS // count for k in range(count + 1)]
    return [(bounds[k], bounds[k + 1] - 1) for k in range(count)]


def node_socket_dir(conf: RunConf, index: int, socket_dir: str | None = None) -> str:
    """Return node ``index``'s 0700 socket directory: ``DIR/.mpiburst_<id>@<k>``, or ``socket_dir/node<k>``."""
    base = os.path.join(socket_dir, f"node{index}") if socket_dir else None
    return socket_dir_path(conf.dir, node_member(conf.id, index), base)


def is_here(entry: dict[str, Any]) -> bool:
    """Return True if the node's server runs on this host (its PID means something here)."""
    return entry.get("hostname", socket.gethostname()) == socket.gethostname()


def launch_node(conf: RunConf, admin: AdminCredentials, index: int, count: int, ranks: tuple[int, int], bind: str,
                maxclients: int, tied: bool, socket_dir: str | None = None) -> dict[str, Any]:
    """Start node ``index``'s cluster-mode server on this host and return its entry for :attr:`RunConf.nodes`.

    With ``conf.replicas`` the node also starts the replica of the previous
    node (``index - 1`` mod ``count``, a ring): its entry is ``"replica_here"``,
    which :func:`form` moves to that node's entry as ``"replica"``.

    Parameters
    ----------
    conf
        The run's conf (its ID, directory, binary, credentials, capacity); not changed or saved.
    admin
        The run's admin user (the same on every node).
    index, count
        This node's index and the number of nodes (they fix the node's slot range).
    ranks
        The half-open range of ranks (channels) on this node.
    bind
        The address the server and its cluster bus listen on.
    tied
        The server gets SIGTERM when this process dies.

    Raises
    ------
    ConfigError
        If the socket directory cannot be made or its path is too long.
    ServerError
        If the server does not come up (its log's tail is in the message).
    """
    entry = launch_server(conf, admin, node_member(conf.id, index), node_socket_dir(conf, index, socket_dir),
                          bind, maxclients, tied, f"node {index}")
    first, last = slot_ranges(count)[index]
    entry.update(ranks=list(ranks), slots=[first, last])
    if conf.replicas:
        partner = (index - 1) % count
        sockdir = socket_dir_path(conf.dir, replica_member(conf.id, partner),
                                  os.path.join(socket_dir, f"node{partner}.replica") if socket_dir else None)
        try:
            entry["replica_here"] = launch_server(conf, admin, replica_member(conf.id, partner), sockdir, bind,
                                                  maxclients, tied, f"node {partner}'s replica")
        except BaseException:
            kill(entry["pid"], conf.server)
            clean_node(conf, index, entry["socket"], keep_snapshot=True)
            raise
    return entry


def kill_node(conf: RunConf, entry: dict[str, Any]) -> None:
    """SIGKILL a node's server and the replica in its entry: the one it hosts (``replica_here``, before
    :func:`form`) or its own (``replica``, after)."""
    kill(entry["pid"], conf.server)
    for name in ("replica_here", "replica"):
        if name in entry:
            kill(entry[name]["pid"], conf.server)


def launch_server(conf: RunConf, admin: AdminCredentials, member: str, sockdir: str, bind: str, maxclients: int,
                  tied: bool, label: str) -> dict[str, Any]:
    """Start one cluster-mode server (files named for ``member``) on a free port and bus port of ``bind``.

    Returns its ``host``, ``port``, ``socket``, ``pid``, ``hostname`` and ``bus_port``.
    """
    sock = os.path.join(sockdir, SOCKET_NAME)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise ConfigError(f"unix socket path {sock} is {len(os.fsencode(sock))} bytes, more than the OS allows "
                          f"({MAX_SOCKET_PATH}); give a shorter directory with --socket-dir (e.g. under /tmp).")
    make_socket_dir(sockdir)
    log = os.path.join(conf.dir, log_name(member))
    remove_file(log)
    remove_file(os.path.join(conf.dir, cluster_conf_name(member)))  # a stale cluster state would rejoin an old cluster
    os.close(create_private(log))
    view = conf.view(bind, 0, sock, None, 0)
    try:
        for _ in range(PORT_ATTEMPTS):
            try:
                view.port = free_port(bind)
                bus = free_port(bind)
            except OSError as exc:
                raise ConfigError(f"cannot listen on address {bind!r} ({exc.strerror}); give another with --bind.") from None
            if bus == view.port:
                continue
            try:
                launch(view, admin, bind, maxclients, tied, member, bus,
                       TlsFiles.of(conf.dir, conf.id) if conf.tls else None)
            except PortInUse:
                continue
            return dict(host=bind, port=view.port, socket=sock, pid=view.pid, hostname=socket.gethostname(),
                        bus_port=bus)
        raise ServerError(f"the server of {label} of run {conf.id} found no free port after {PORT_ATTEMPTS} "
                          f"attempts; try again.")
    except BaseException:
        if view.pid:
            kill(view.pid, conf.server)
        _clean_member(conf, member, sock, keep_snapshot=True)   # a failed restart keeps the snapshot it came for
        raise


def form(conf: RunConf, admin: AdminCredentials, timeout: float | None = None) -> None:
    """Join the servers of ``conf.nodes`` into one cluster and wait until it serves every slot.

    Node ``k`` adds its slot range (``entry["slots"]``; of a node restarted
    from its snapshot, the part its keys did not already claim), node 0
    meets every other node, then every node must see all nodes, all slots
    assigned and ``cluster_state:ok``.

    Raises
    ------
    ServerError
        If a node refuses (a server older than Redis 7.0 / Valkey 7.2 lacks
        ADDSLOTSRANGE) or the cluster is not whole within ``timeout`` seconds
        (default :data:`FORM_TIMEOUT`).
    """
    _place_replicas(conf)
    clients: list[redis.Redis] = []
    replicas: list[redis.Redis] = []
    try:
        for k in range(len(conf.nodes)):
            clients.append(connect_redis(conf.node(k), admin=admin))
        for k in range(len(conf.nodes) if conf.replicas else 0):
            view = conf.replica(k)
            assert view is not None, "every node launched its partner's replica"
            replicas.append(connect_redis(view, admin=admin))
        try:
            for client, entry in zip(clients, conf.nodes):
                lacking = _missing_slots(client, *entry["slots"])
                if lacking:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", *[s for r in lacking for s in r])
            for entry in conf.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", entry["host"], entry["port"], entry["bus_port"])
            for entry in conf.nodes if replicas else []:
                clients[0].execute_command("CLUSTER", "MEET", entry["replica"]["host"], entry["replica"]["port"],
                                           entry["replica"]["bus_port"])
        except redis.RedisError as exc:
            raise ServerError(f"the servers of run {conf.id} cannot form a cluster ({exc}); a run over several nodes "
                              f"needs Redis >= 7.0 or Valkey >= 7.2.") from None
        timeout = FORM_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        paired = False
        while True:
            missing = _not_formed(conf, clients + replicas)
            if missing is None and replicas and not paired:
                try:
                    for client, replica in zip(clients, replicas):
                        replica.execute_command("CLUSTER", "REPLICATE", _text(client.execute_command("CLUSTER", "MYID")))
                except redis.RedisError as exc:
                    raise ServerError(f"the servers of run {conf.id} cannot pair each node with its replica ({exc}); "
                                      f"see the logs in {conf.dir}.") from None
                paired = True
            if missing is None and replicas:
                missing = _not_linked(replicas)
            if missing is None:
                return
            if time.monotonic() > deadline:
                raise ServerError(f"the servers of run {conf.id} did not form one cluster within {timeout:.0f} s "
                                  f"({missing}); see the logs {log_name(node_member(conf.id, 0))} etc. in {conf.dir}.")
            time.sleep(0.05)
    finally:
        for client in clients + replicas:
            client.close()


def _place_replicas(conf: RunConf) -> None:
    """Move each node's ``replica_here`` (the replica of the previous node it started) to that node's ``replica``."""
    count = len(conf.nodes)
    for k, here in enumerate([entry.pop("replica_here", None) for entry in conf.nodes]):
        if here is not None:
            conf.nodes[(k - 1) % count]["replica"] = here


def _text(reply: Any) -> str:
    """Return a server's reply as text."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def replication_info(client: redis.Redis) -> dict[str, str]:
    """Return the fields of a server's ``INFO replication`` (``role``, ``master_link_status``, ...) as text."""
    return {str(k): str(v) for k, v in client.info("replication").items()}


def _not_linked(replicas: list[redis.Redis]) -> str | None:
    """Return which replica has not yet synced with its primary, or None when every one has."""
    for k, replica in enumerate(replicas):
        try:
            info = replication_info(replica)
        except redis.RedisError as exc:
            return f"node {k}'s replica does not answer: {exc}"
        if info.get("role") != "slave" or info.get("master_link_status") != "up":
            return f"node {k}'s replica is {info.get('role')}, link {info.get('master_link_status')}"
    return None


def _missing_slots(client: redis.Redis, first: int, last: int) -> list[tuple[int, int]]:
    """Return the ranges of slots ``first``..``last`` the node does not serve yet.

    A node restarted from its snapshot has already taken the slots its keys
    hash to (the server claims an unassigned slot it holds keys of), and
    ``ADDSLOTSRANGE`` refuses a slot that is taken, even by the node itself.
    """
    text = client.execute_command("CLUSTER", "NODES")
    text = text.decode() if isinstance(text, bytes) else str(text)
    owned: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 8 and "myself" in fields[2].split(","):
            for item in fields[8:]:
                if not item.startswith("["):
                    lo, _, hi = item.partition("-")
                    owned.update(range(int(lo), int(hi or lo) + 1))
    ranges: list[tuple[int, int]] = []
    for slot in range(first, last + 1):
        if slot in owned:
            continue
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges


def _not_formed(conf: RunConf, clients: list[redis.Redis]) -> str | None:
    """Return what is still missing from the cluster (which server, what it sees), or None when it is whole.

    ``clients``: every server of the run, the nodes' then their replicas'."""
    count = len(clients)
    for k, client in enumerate(clients):
        try:
            info = client.execute_command("CLUSTER", "INFO")
        except redis.RedisError as exc:
            return f"node {k} does not answer: {exc}"
        if isinstance(info, bytes):
            info = info.decode()
        fields = dict(line.split(":", 1) for line in str(info).split() if ":" in line)
        known, assigned = int(fields.get("cluster_known_nodes", 0)), int(fields.get("cluster_slots_assigned", 0))
        if known != count or assigned != SLOTS or fields.get("cluster_state") != "ok":
            return (f"node {k} sees {known} of {count} nodes, {assigned} of {SLOTS} slots assigned, "
                    f"cluster_state:{fields.get('cluster_state')}")
    return None


def clean_node(conf: RunConf, index: int, sock: str | None = None, keep_snapshot: bool = False) -> None:
    """Remove node ``index``'s server files (socket and its directory, config, log, cluster state, entry, snapshot)
    and those of its replica, if it has one."""
    entry = conf.nodes[index] if index < len(conf.nodes) else {}
    _clean_member(conf, node_member(conf.id, index), sock or entry.get("socket", ""), keep_snapshot)
    remove_file(node_entry_path(conf.dir, conf.id, index))
    replica = entry.get("replica")
    if conf.replicas:
        _clean_member(conf, replica_member(conf.id, index), replica["socket"] if replica else "", False)


def _clean_member(conf: RunConf, member: str, sock: str, keep_snapshot: bool) -> None:
    """Remove one server's files: socket (and its directory), config, log, cluster state, snapshot unless kept."""
    if sock:
        remove_file(sock)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(sock))
    for name in (server_conf_path(conf.dir, member), os.path.join(conf.dir, log_name(member)),
                 os.path.join(conf.dir, cluster_conf_name(member))):
        remove_file(name)
    if not keep_snapshot:
        remove_file(os.path.join(conf.dir, rdb_name(member)))


def node_alive(conf: RunConf, index: int) -> bool:
    """Return True if node ``index``'s server runs: by PID on its own host, else by an answer to PING."""
    return server_alive(conf, conf.node(index), conf.nodes[index])


def serving(conf: RunConf, index: int, wait: float = 0.0) -> tuple[RunConf, bool] | None:
    """Return the connection view of the server that serves node ``index``'s keys now, and whether it is the
    node's replica; None if none serves them.

    Its replica once promoted (the node's own server is then gone, or back
    as a replica of it), else its own server if it runs. ``wait``: seconds
    to wait for the replica of a node whose own server is gone to be
    promoted (the cluster takes about 6-7 s).
    """
    replica = conf.replica(index)
    deadline = time.monotonic() + wait
    while True:
        answered = False
        if replica is not None:
            with contextlib.suppress(ServerError, redis.RedisError):
                client = connect_redis(replica)
                try:
                    if replication_info(client).get("role") == "master":
                        return replica, True
                    answered = True
                finally:
                    client.close()
        if node_alive(conf, index):
            return conf.node(index), False
        if not answered or time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def server_alive(conf: RunConf, view: RunConf, entry: dict[str, Any]) -> bool:
    """Return True if the server of ``entry`` (``view``: its connection view) runs: by PID here, else by PING."""
    if is_here(entry):
        return pid_alive(entry["pid"], conf.server)
    try:
        connect_redis(view).close()
        return True
    except ServerError:
        return False


def stop_nodes(conf: RunConf, admin: AdminCredentials, timeout: float) -> list[int]:
    """SHUTDOWN NOSAVE every node's server (and replica) and wait for each to end; return the nodes already gone.

    A node counts as gone when its own server was (its replica, promoted, may have served it since).
    """
    gone = []
    for k, entry in enumerate(conf.nodes):
        if not _stop_server(conf, conf.node(k), entry, admin, timeout):
            gone.append(k)
        replica = conf.replica(k)
        if replica is not None:
            _stop_server(conf, replica, entry["replica"], admin, timeout)
    return gone


def _stop_server(conf: RunConf, view: RunConf, entry: dict[str, Any], admin: AdminCredentials, timeout: float) -> bool:
    """SHUTDOWN NOSAVE one server and wait for it to end (SIGKILL after ``timeout`` here); False if it was gone."""
    if not server_alive(conf, view, entry):
        return False
    try:
        client = connect_redis(view, admin=admin)
    except ServerError:
        return False
    try:
        client.shutdown(nosave=True)
    except redis.RedisError:
        pass  # the connection closes while the server exits; the check below decides
    finally:
        client.close()
    if is_here(entry):
        if not wait_gone(entry["pid"], conf.server, timeout):
            kill(entry["pid"], conf.server)
    else:
        deadline = time.monotonic() + timeout
        while server_alive(conf, view, entry) and time.monotonic() < deadline:
            time.sleep(0.05)
    return True


def node_status(conf: RunConf, index: int) -> dict[str, Any]:
    """Return node ``index``'s state: up, pid, host, port, ranks, slots, used memory, clients, replica.

    ``replica`` (a run with replicas): ``"linked"``, ``"serving"`` (promoted:
    it serves the node, whose own server is gone, and ``up`` is True),
    ``"down"``; None without one. Memory and clients are then the serving server's.
    """
    entry = conf.nodes[index]
    info: dict[str, Any] = dict(node=index, up=node_alive(conf, index), pid=entry["pid"], host=entry["host"],
                                port=entry["port"], hostname=entry.get("hostname"), ranks=entry["ranks"],
                                slots=entry["slots"], used_memory=None, clients=None, replica=None)
    view = conf.node(index)
    replica = conf.replica(index)
    if replica is not None:
        info["replica"] = "down"
        with contextlib.suppress(ServerError, redis.RedisError):
            client = connect_redis(replica)
            try:
                role = replication_info(client).get("role")
            finally:
                client.close()
            info["replica"] = "serving" if role == "master" else "linked"
        if info["replica"] == "serving":   # the node's own server is gone, or back as its replica
            info["up"], view = True, replica
    if info["up"]:
        client = connect_redis(view)
        try:
            stats = client.info()
        finally:
            client.close()
        info["used_memory"] = stats.get("used_memory")
        info["clients"] = max(0, int(stats.get("connected_clients", 1)) - 1)
    return info
