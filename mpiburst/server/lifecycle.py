"""A run's lifecycle: start the server (config, socket directory, port, wait for PING), stop it, report it.

One ``redis-server`` or ``valkey-server`` runs per run ID, started by rank 0
(or ``mpiburst start``) and stopped by its own PID, never by name. The
passwords live in the 0600 ``mpiburst_<id>.conf`` and never on a command
line, in an environment or in a log; the server starts with umask 077 in its
own session.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .. import iostats
from ..align import detect_align
from ..errors import ConfigError, MpiburstError, ServerError
from ..runconf import (
    AdminCredentials,
    RunConf,
    admin_path,
    conf_path,
    create_private,
    engine_log_name,
    log_name,
    new_password,
    node_member,
    rdb_name,
    replica_member,
    resolve_id,
    server_conf_path,
    socket_dir_path,
    write_secure,
)
from ..store import ClusterStore
from ..store.cluster_store import FAILOVER_WAIT
from . import cluster
from .config import ADMIN_USER, USER
from .connection import connect_redis, connect_store
from .discovery import default_bind, find_server, free_port, host_address, job_nodes, node_address
from .launch import MAX_SOCKET_PATH, SOCKET_NAME, PortInUse, launch, make_socket_dir, remove_file
from .options import DEFAULT_REPLICATED_CAPACITY, StartOptions, parse_capacity
from .process import engine_alive, kill, log_tail, pid_alive, wait_gone
from .runlock import RunLock
from .tls import TRUST_NETWORK, has_tls, make_certificates, remove_certificates, trust_network_from_env

STOP_TIMEOUT = 30.0
PORT_ATTEMPTS = 5


def saved_nodes(directory: str, run_id: str) -> int:
    """Return how many nodes of a multi-node run left a snapshot ``redis_<id>@<k>.rdb`` in ``directory`` (0: none)."""
    count = 0
    while os.path.exists(os.path.join(directory, rdb_name(node_member(run_id, count)))):
        count += 1
    return count


def _has_snapshot(directory: str, run_id: str) -> bool:
    """Return True if run ``run_id`` left a snapshot in ``directory``: its own, or every node's."""
    return os.path.exists(os.path.join(directory, rdb_name(run_id))) or saved_nodes(directory, run_id) > 0


def clean_run(conf: RunConf, keep_snapshot: bool) -> None:
    """Remove a stopped run's files: socket, server config, logs, and (unless kept) conf and snapshot.

    For a multi-node run, every node's files too; its snapshots
    ``redis_<id>@<k>.rdb`` are kept with ``keep_snapshot``, as is the conf
    (every PID None), for ``mpiburst start --restart``.
    """
    for k in range(len(conf.nodes)):
        cluster.clean_node(conf, k, keep_snapshot=keep_snapshot)
    sockdir = os.path.dirname(conf.socket)
    remove_file(conf.socket)
    with contextlib.suppress(OSError):
        os.rmdir(sockdir)
    remove_file(server_conf_path(conf.dir, conf.id))
    remove_file(os.path.join(conf.dir, log_name(conf.id)))
    remove_file(os.path.join(conf.dir, engine_log_name(conf.id)))
    remove_file(admin_path(conf.dir, conf.id))
    remove_certificates(conf.dir, conf.id)
    if keep_snapshot:
        conf.pid = None
        for entry in conf.nodes:
            entry["pid"] = None
        conf.save()
    else:
        remove_file(os.path.join(conf.dir, rdb_name(conf.id)))
        remove_file(conf.path)


# ----------------------------------------------------------------------------- start

def _check_existing(directory: str, run_id: str, restart: bool) -> RunConf | None:
    """Refuse to start over a live run; clean a stale one; return the old conf when restarting."""
    path = conf_path(directory, run_id)
    old = None
    if os.path.lexists(path):
        old = RunConf.load(path)
        if pid_alive(old.pid, old.server):
            raise ConfigError(
                f"run {run_id} already has a server running (PID {old.pid}); stop it with "
                f"'mpiburst stop --id {run_id}' or choose another ID."
            )
        if old.pid is not None:  # stale: the server died and left its files
            clean_run(old, keep_snapshot=_has_snapshot(directory, run_id))
    rdb = os.path.join(directory, rdb_name(run_id))
    if saved_nodes(directory, run_id):
        rdb = os.path.join(directory, rdb_name(node_member(run_id, 0)))  # and one per further node
    if restart and not _has_snapshot(directory, run_id):
        raise ConfigError(f"cannot restart run {run_id}: no snapshot {rdb}; start it without --restart.")
    if not restart and _has_snapshot(directory, run_id):
        raise ConfigError(
            f"run {run_id} has a saved snapshot {rdb}; reload it with --restart, or remove it with "
            f"'mpiburst stop --discard --id {run_id}'."
        )
    return old


def start_run(options: StartOptions | None = None, *, tied: bool = False, **changes: Any) -> RunConf:
    """Start the server of a run and return its conf (already saved as ``mpiburst_<id>.conf``).

    Parameters
    ----------
    options, **changes
        The start options (:class:`StartOptions`, or their names as keywords).
        ``channels`` defaults to 1 (or the old run's count with ``restart``),
        ``dir`` and ``bfs_root`` to the current directory, ``capacity`` to 50%
        of node memory.
    tied
        The server gets SIGTERM when this process dies (what
        :meth:`mpiburst.tier.Tier.start` uses, so an aborted MPI job leaves no
        server behind); ``mpiburst start`` leaves it untied, as the command
        returns while the server runs.

    Without ``bind`` or ``port``, a run on one node listens on its unix socket
    only (no TCP port another user of the node could fill up); a job spanning
    several nodes listens on this host's address too.

    With ``restart`` and the snapshots of a multi-node run (``redis_<id>@<k>.rdb``,
    saved by :func:`stop_run`), its nodes are restarted on this host
    (:func:`start_cluster`), each from its own snapshot.

    Raises
    ------
    ConfigError
        On a bad option, an unwritable directory, a live run with the same ID,
        or another process starting the same run.
    ServerError
        If no server binary is found or the server does not come up.
    """
    opts = StartOptions.of(options, **changes)
    run_id = resolve_id(opts.id, warn=True)
    directory = run_directory(opts.dir)
    saved = saved_nodes(directory, run_id) if opts.restart else 0
    if saved:  # the snapshot of a multi-node run: its nodes come back as servers on this host
        return start_cluster(opts.replace(id=run_id, dir=directory), nodes=saved, tied=tied)
    with RunLock(directory, run_id, "mpiburst start"):
        return _start_locked(opts, run_id, directory, tied)


def run_directory(directory: str | None) -> str:
    """Return the absolute run directory (default: the current one), checked to be a writable directory."""
    path = os.path.abspath(directory or os.getcwd())
    if not os.path.isdir(path):
        raise ConfigError(f"run directory {path} does not exist; create it or choose another with --dir.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {path} is not writable; choose another with --dir.")
    return path


def _new_conf(opts: StartOptions, run_id: str, directory: str, old: RunConf | None, sock: str) -> RunConf:
    """Return the conf of a run about to start (fresh ranks' password, no server yet)."""
    channels = opts.channels or (old.channels if old else 1)
    bfs_root = os.path.abspath(opts.bfs_root or (old.bfs_root if old else directory))
    if not os.path.isdir(bfs_root):
        raise ConfigError(f"BFS root {bfs_root} is not a directory; create it or give another with --bfs-root.")
    return RunConf(
        id=run_id, dir=directory, host="", port=0, socket=sock, user=USER, password=new_password(),
        channels=channels, bfs_root=bfs_root,
        capacity=parse_capacity(opts.capacity), align=detect_align(bfs_root, opts.align), pid=None,
        server=find_server(opts.server),
    )


def choose_maxclients(opts: StartOptions, channels: int) -> int:
    """Return the server's ``maxclients``: the option (checked against ``channels``), else ``max(1024, 4 x channels)``."""
    if opts.maxclients:
        opts.replace(channels=channels)  # a restart's channel count may need more clients
    return opts.maxclients or max(1024, 4 * channels)


def _start_locked(opts: StartOptions, run_id: str, directory: str, tied: bool) -> RunConf:
    """Start the run's server; the caller holds the run's start lock."""
    old = _check_existing(directory, run_id, opts.restart)
    sockdir = socket_dir_path(directory, run_id, opts.socket_dir)
    sock = os.path.join(sockdir, SOCKET_NAME)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"unix socket path {sock} is {len(os.fsencode(sock))} bytes, more than the OS allows "
            f"({MAX_SOCKET_PATH}); give a shorter directory with --socket-dir (e.g. under /tmp)."
        )
    conf = _new_conf(opts, run_id, directory, old, sock)
    maxclients = choose_maxclients(opts, conf.channels)
    tcp = opts.bind is not None or opts.port is not None or job_nodes() > 1
    bind = opts.bind or default_bind()
    if tcp:
        conf.host = host_address() if bind in ("0.0.0.0", "*") else bind
    make_socket_dir(sockdir)
    log = os.path.join(directory, log_name(run_id))
    remove_file(log)
    os.close(create_private(log))
    admin = AdminCredentials(ADMIN_USER, new_password())
    conf.save()
    try:
        admin.save(conf)
        for attempt in range(PORT_ATTEMPTS if tcp else 1):
            if tcp:
                try:
                    conf.port = opts.port if (opts.port and attempt == 0) else free_port(bind)
                except OSError as exc:
                    raise ConfigError(f"cannot listen on address {bind!r} ({exc.strerror}); "
                                      f"give another with --bind.") from None
            try:
                launch(conf, admin, bind, maxclients, tied)
                return conf
            except PortInUse:
                continue
        raise ServerError(f"the server of run {run_id} found no free port after {PORT_ATTEMPTS} attempts; "
                          f"give one with --port.")
    except BaseException:
        if conf.pid:
            kill(conf.pid, conf.server)
        clean_run(conf, keep_snapshot=opts.restart)
        if not opts.restart:
            remove_file(conf.path)
        raise


# ----------------------------------------------------------------------------- several nodes

@dataclass
class ClusterPlan:
    """What the starting process decides before any node's server runs, sent to every node's first rank.

    ``conf`` is the run's conf without nodes (saved with ``pid`` None);
    ``admin`` the one admin user of every node; ``bind`` the ``--bind``
    option (one address, one per node, or ``None``: each node's own, see
    :func:`.discovery.node_address`).
    """

    conf: RunConf
    admin: AdminCredentials
    maxclients: int
    bind: str | None
    socket_dir: str | None


def use_tls(opts: StartOptions, binary: str) -> bool:
    """Return whether a multi-node run uses mutual TLS: always, unless the user trusts the network.

    Raises
    ------
    ConfigError
        If ``binary`` has no TLS and the network is not declared private to the job.
    """
    trusted = trust_network_from_env() if opts.trust_network is None else opts.trust_network
    if trusted:
        return False
    if not has_tls(binary):
        raise ConfigError(f"the server {binary} has no TLS, and a run over several nodes needs it, since any user who "
                          f"reaches a node could read the data or take the cluster over (docs/security.md): install "
                          f"one with TLS (Debian's redis-server: apt-get install redis-server) and give it with "
                          f"--server, or, if the network is private to the job, pass --trust-network "
                          f"({TRUST_NETWORK}=1).")
    return True


def plan_cluster(opts: StartOptions, nodes_here: bool, count: int, addresses: Sequence[str] = ()) -> ClusterPlan:
    """Check and write down a multi-node run before its servers start (the caller holds the run's start lock).

    Unless the network is trusted (``opts.trust_network``), the run uses
    mutual TLS: the run's CA and certificate are made here (:mod:`.tls`).

    Parameters
    ----------
    nodes_here
        Every node is this host (simulated nodes): the servers and their
        cluster buses listen on loopback only; otherwise on each node's
        address (or ``opts.bind``).
    count
        The number of nodes; with ``opts.restart`` it must be the number of
        the saved run's nodes (each node reloads its own snapshot).
    addresses
        The nodes' addresses known now (the certificate names them); default:
        those ``opts.bind`` gives, else this host's (node 0 of a run
        started node by node).

    Raises
    ------
    ConfigError
        On a bad option, a live run with the same ID, a saved snapshot
        without ``restart`` (or none with it), a restart on another number
        of nodes, or a server without TLS on an untrusted network.
    """
    if opts.port is not None:
        raise ConfigError("a run over several nodes picks a free port on each node; leave --port out.")
    run_id = resolve_id(opts.id, warn=True)
    directory = run_directory(opts.dir)
    old = _check_existing(directory, run_id, opts.restart)
    saved = saved_nodes(directory, run_id)
    if opts.restart and saved != count:
        raise ConfigError(f"run {run_id} was saved {'on ' + str(saved) + ' nodes' if saved else 'as one server'}; "
                          f"restart it on {saved or 1} node{'s' if saved != 1 else ''} ('mpiburst stage-out --id "
                          f"{run_id}' reloads it on this host).")
    replicas = opts.replica_count()
    if replicas and opts.capacity is None:   # each node holds its own server's data and a neighbour's copy
        opts = opts.replace(capacity=DEFAULT_REPLICATED_CAPACITY)
    conf = _new_conf(opts, run_id, directory, old, "")
    conf.replicas = replicas
    conf.tls = use_tls(opts, conf.server)
    bind = opts.bind or ("127.0.0.1" if nodes_here else None)
    if not addresses:
        addresses = [node_address(bind, k, count) for k in range(count if bind else 1)]
    admin = AdminCredentials(ADMIN_USER, new_password())
    try:
        if conf.tls:   # before the conf: a node started by a prolog launches as soon as it reads the conf
            make_certificates(directory, run_id, addresses)
        conf.save()
        admin.save(conf)
    except BaseException:
        abandon_cluster(conf, keep_conf=opts.restart)
        raise
    if not conf.tls:
        print(f"mpiburst: the {count} nodes of run {run_id} talk plaintext TCP, without TLS: the network was "
              f"declared private to the job (--trust-network / {TRUST_NETWORK}=1).", file=sys.stderr)
    return ClusterPlan(conf, admin, choose_maxclients(opts, conf.channels), bind,
                       os.path.abspath(opts.socket_dir) if opts.socket_dir else None)


def launch_planned_node(plan: ClusterPlan, index: int, count: int, ranks: tuple[int, int], tied: bool) -> dict[str, Any]:
    """Start node ``index`` of a planned run on this host (its first rank calls this); return its node entry."""
    bind = node_address(plan.bind, index, count)
    return cluster.launch_node(plan.conf, plan.admin, index, count, ranks, bind, plan.maxclients, tied, plan.socket_dir)


def form_planned(plan: ClusterPlan, entries: list[dict[str, Any]]) -> RunConf:
    """Join the started nodes into one cluster, record them in the run conf, save it and return it."""
    conf = plan.conf
    conf.nodes = list(entries)
    conf.host, conf.port, conf.socket, conf.pid = (entries[0][k] for k in ("host", "port", "socket", "pid"))
    cluster.form(conf, plan.admin)
    _log_network(conf)
    conf.save()
    return conf


def _log_network(conf: RunConf) -> None:
    """Record in the run's event log how its nodes talk (mutual TLS, or plaintext on a trusted network): the report says so."""
    clients = [connect_redis(conf.node(k), check=k == 0) for k in range(len(conf.nodes))]
    try:
        ClusterStore(clients, None, ranks=[n["ranks"] for n in conf.nodes],
                     slots=[n["slots"] for n in conf.nodes]).stats_log({"kind": "network", "t": time.time(),
                                                                         "tls": conf.tls})
    finally:
        for client in clients:
            client.close()


def abandon_cluster(conf: RunConf, keep_conf: bool = False) -> None:
    """Remove the run-wide files of a multi-node run that failed to start (each node cleans its own).

    With ``keep_conf`` (a failed restart) the conf stays, without a server, beside the kept snapshots.
    """
    remove_file(admin_path(conf.dir, conf.id))
    remove_certificates(conf.dir, conf.id)
    if keep_conf:
        conf.pid, conf.nodes = None, []
        conf.save()
    else:
        remove_file(conf.path)


def start_cluster(options: StartOptions | None = None, nodes: int = 3, *, tied: bool = False,
                  **changes: Any) -> RunConf:
    """Start a run of ``nodes`` cluster-mode servers on this machine, joined into one cluster (one process).

    For tests and tools that need a real cluster without MPI, and for
    reloading a saved multi-node run on one host (``restart``): node ``k``
    serves ranks ``[k*c/n, (k+1)*c/n)`` of the run's ``c`` channels. The
    servers listen on loopback (or ``bind``) and their unix sockets. Stop it
    with :func:`stop_run`.

    Raises
    ------
    ConfigError, ServerError
        As :func:`start_run`; no server is left running.
    """
    opts = StartOptions.of(options, **changes)
    if nodes < 2:
        raise ConfigError(f"a cluster run needs at least 2 nodes, not {nodes}; use start_run for one server.")
    directory = run_directory(opts.dir)
    with RunLock(directory, resolve_id(opts.id), "mpiburst start"):
        plan = plan_cluster(opts, nodes_here=True, count=nodes)
        channels = plan.conf.channels
        entries: list[dict[str, Any]] = []
        try:
            for k in range(nodes):
                ranks = (k * channels // nodes, (k + 1) * channels // nodes)
                entries.append(launch_planned_node(plan, k, nodes, ranks, tied))
            return form_planned(plan, entries)
        except BaseException:
            for k, entry in enumerate(entries):
                cluster.kill_node(plan.conf, entry)
                cluster.clean_node(plan.conf, k, entry["socket"], keep_snapshot=True)
            abandon_cluster(plan.conf, keep_conf=opts.restart)
            raise


# ----------------------------------------------------------------------------- stop / status

def stop_run(conf: RunConf, save: bool = False, discard: bool = False, timeout: float = STOP_TIMEOUT,
             exposed_ok: bool = False) -> str:
    """Stop the run's server by its PID and remove its files; return a one-line report.

    With ``save``, the admin user runs SAVE first; if that fails (a full
    disk), nothing is stopped and the error says where the data is and how to
    get it out. Then the engine is stopped and the server gets SHUTDOWN
    NOSAVE; the snapshot and the conf stay for ``mpiburst start --restart``.
    With ``discard`` any snapshot is removed too. Without either, nothing is
    written and an older snapshot stays.

    Parameters
    ----------
    exposed_ok
        Accept an admin file that group or others may read (``mpiburst stop``
        does: stopping is the cure for a password that may be known).

    Raises
    ------
    ConfigError
        If the run is not running and there is nothing to discard.
    ServerError
        If SAVE fails (the server keeps running, with the data).
    """
    if save and discard:
        raise ConfigError("choose either --save or --discard, not both.")
    if conf.nodes:
        return _stop_cluster(conf, save, discard, timeout, exposed_ok)
    rdb = os.path.join(conf.dir, rdb_name(conf.id))
    if not pid_alive(conf.pid, conf.server):
        if conf.pid is None and not discard:
            raise ConfigError(
                f"run {conf.id} is not running (its snapshot {rdb} is kept); restart it with "
                f"'mpiburst start --restart --id {conf.id}' or remove it with 'mpiburst stop --discard --id {conf.id}'."
            )
        _end_engine(conf)   # it would end by itself soon, but stop means stopped: no child left behind
        was = "was stopped" if conf.pid is None else f"was not running (PID {conf.pid} gone)"
        clean_run(conf, keep_snapshot=os.path.exists(rdb) and not discard)
        return f"run {conf.id} {was}; its files were removed."
    admin = connect_redis(conf, admin=AdminCredentials.load(conf, exposed_ok=exposed_ok))
    try:
        if save:
            try:
                admin.save()
            except redis.RedisError as exc:
                raise ServerError(_save_failed(conf, exc)) from None
        _end_engine(conf)
        _save_stats(conf)
        with contextlib.suppress(redis.RedisError):  # the connection closes while the server exits;
            admin.shutdown(nosave=True)                # the PID check below decides
    finally:
        admin.close()
    if not wait_gone(conf.pid, conf.server, timeout):
        kill(conf.pid, conf.server)
    clean_run(conf, keep_snapshot=(save or os.path.exists(rdb)) and not discard)
    if save:
        return f"run {conf.id} stopped; snapshot saved in {rdb} (reload with 'mpiburst start --restart --id {conf.id}')."
    return f"run {conf.id} stopped."


def _stop_cluster(conf: RunConf, save: bool, discard: bool, timeout: float, exposed_ok: bool) -> str:
    """Stop every node's server of a multi-node run (each saving its own snapshot first with ``save``), then its
    engine, and remove the run's files (the snapshots and the conf stay when saved, see :func:`stop_run`)."""
    count = len(conf.nodes)
    saved = saved_nodes(conf.dir, conf.id) == count
    first = os.path.join(conf.dir, rdb_name(node_member(conf.id, 0)))
    # a node's promoted replica serves it after a failover (a save waits for one being promoted)
    views = [cluster.serving(conf, k, wait=FAILOVER_WAIT if save else 0.0) for k in range(count)]
    alive = [k for k, view in enumerate(views) if view is not None]
    if not alive:
        if conf.pid is None and saved and not discard:
            raise ConfigError(f"run {conf.id} is not running (its {count} snapshots {first} etc. are kept); restart "
                              f"it with 'mpiburst start --restart --id {conf.id}' or remove them with "
                              f"'mpiburst stop --discard --id {conf.id}'.")
        _end_engine(conf)
        was = "was stopped" if conf.pid is None else f"was not running (its {count} servers are gone)"
        clean_run(conf, keep_snapshot=saved and not discard)
        return f"run {conf.id} {was}; its files were removed."
    admin = AdminCredentials.load(conf, exposed_ok=exposed_ok)
    if save:
        _save_nodes(conf, admin, views)
    _end_engine(conf)
    _save_stats(conf, alive)   # read the run's statistics before any server goes
    gone = cluster.stop_nodes(conf, admin, timeout)
    clean_run(conf, keep_snapshot=(save or saved) and not discard)
    if save:
        return (f"run {conf.id} stopped: {count} servers; each node's snapshot saved in {first} etc. (reload with "
                f"'mpiburst start --restart --id {conf.id}').")
    lost = sorted(set(gone) | (set(range(len(conf.nodes))) - set(alive)))
    note = f" (node{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} had already ended)" if lost else ""
    return f"run {conf.id} stopped: {len(conf.nodes)} servers{note}."


def _save_nodes(conf: RunConf, admin: AdminCredentials, views: Sequence[tuple[RunConf, bool] | None]) -> None:
    """SAVE every node's server to its own ``redis_<id>@<k>.rdb``; nothing is stopped if one cannot be saved.

    ``views``: the server that serves each node (:func:`cluster.serving`),
    None for a node down. A node whose replica took over is saved from
    that replica, whose snapshot then takes the node's name: a restart
    reloads it as that node's server.

    Raises
    ------
    ServerError
        If a node is down (its data is lost: no snapshot could restore the
        run) or its SAVE fails; the snapshots this call wrote are removed
        then (the servers, still running, hold every byte), so no mix of old
        and new snapshots is left to restart from.
    """
    where = f"--id {conf.id} --dir {shlex.quote(conf.dir)}"
    down = [k for k, view in enumerate(views) if view is None]
    if down:
        raise ServerError(f"node{'s' if len(down) > 1 else ''} {', '.join(map(str, down))} of run {conf.id} "
                          f"{'are' if len(down) > 1 else 'is'} down, so the run cannot be saved whole; nothing was "
                          f"stopped: copy what the other nodes hold to the BFS with 'mpiburst stage-out {where}', "
                          f"or drop it with 'mpiburst stop --discard {where}'.")
    for k, serves in enumerate(views):
        assert serves is not None
        view, promoted = serves
        member = replica_member(conf.id, k) if promoted else node_member(conf.id, k)
        client = connect_redis(view, admin=admin)
        try:
            client.save()
            if promoted:   # the promoted replica's snapshot is the node's now
                os.replace(os.path.join(conf.dir, rdb_name(member)),
                           os.path.join(conf.dir, rdb_name(node_member(conf.id, k))))
        except (redis.RedisError, OSError) as exc:
            for j in range(len(conf.nodes)):
                remove_file(os.path.join(conf.dir, rdb_name(node_member(conf.id, j))))
            cause = (_save_cause(exc, os.path.join(conf.dir, log_name(member))) if isinstance(exc, redis.RedisError)
                     else str(exc))
            raise ServerError(f"saving node {k} of run {conf.id} failed ({cause}); "
                              f"nothing was stopped and no snapshot kept: the data is still in the run's servers. "
                              f"Copy it to the BFS with 'mpiburst stage-out {where}', or free space in {conf.dir} "
                              f"and run 'mpiburst stop --save {where}'; 'mpiburst stop --discard {where}' drops "
                              f"it.") from None
        finally:
            client.close()


def _save_cause(exc: Exception, log: str) -> str:
    """Return why a SAVE failed: the server's answer, or (a bare ERR) the reason its log ``log`` gives."""
    cause = str(exc).strip()
    if cause in ("", "ERR"):  # the server answers a failed SAVE with a bare ERR; its log says why
        lines = log_tail(log, 20).split(" | ")
        cause = next((ln.split(" * ")[-1].split(" # ")[-1] for ln in reversed(lines)
                      if "sav" in ln.lower() or "error" in ln.lower()), "the server's log gives no reason")
    return cause


def _save_failed(conf: RunConf, exc: Exception) -> str:
    """Return the message for a failed SAVE: its cause, where the data is, the commands that get it out."""
    cause = _save_cause(exc, os.path.join(conf.dir, log_name(conf.id)))
    where = f"--id {conf.id} --dir {shlex.quote(conf.dir)}"
    return (f"saving run {conf.id} to {os.path.join(conf.dir, rdb_name(conf.id))} failed ({cause}); nothing was "
            f"stopped: the data is still in the run's server (PID {conf.pid}, conf {conf.path}). Copy it to the BFS "
            f"with 'mpiburst stage-out {where}', or free space in {conf.dir} and run 'mpiburst stop --save {where}'; "
            f"'mpiburst stop --discard {where}' drops it.")


def _save_stats(conf: RunConf, alive: list[int] | None = None) -> None:
    """Save the run's I/O statistics beside its files (0600), for ``mpiburst report`` once the server is gone.

    Only for a run that recorded I/O (a started and stopped run leaves
    nothing behind). After the engine's last sample; read as the ranks' user (the admin user
    may not read data). A multi-node run's statistics are read through its
    cluster store from the nodes ``alive`` (each holds its processes'
    counters; node 0 the event log); when some are down, a ``missing``
    event naming them is added to the log, so the report says what it lacks
    (a run whose surviving nodes recorded nothing still leaves nothing).
    Best effort: a failure here never keeps a run from stopping.
    """
    try:
        nodes = list(range(len(conf.nodes))) if alive is None else alive
        first = nodes[0] if nodes else 0
        store, _ = connect_store(conf, None, check=[first])
        try:
            stats = store.stats_of(nodes) if isinstance(store, ClusterStore) else store.stats()
        finally:
            store.close()
        if stats[0] or any(e.get("kind") not in ("fill", "network") for e in stats[1]):  # a run that did I/O
            lost = [k for k in range(len(conf.nodes)) if k not in nodes]
            if lost:
                stats[1].append({"kind": "missing", "t": time.time(), "nodes": lost})
            write_secure(iostats.stats_path(conf.dir, conf.id), iostats.dump_stats(stats))
    except (MpiburstError, redis.RedisError, OSError, ValueError):
        pass


def _end_engine(conf: RunConf) -> None:
    """Stop the run's automatic engine by its PID and wait for it (SIGKILL after a while).

    The engine finishes the operation at hand on SIGTERM; it also exits by
    itself once the server is gone, and then its PID may be another
    process's: only a PID that is still this run's engine is signalled.
    """
    pid = conf.engine_pid
    if pid is None or not engine_alive(pid, conf.dir):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(pid, None, STOP_TIMEOUT):
        kill(pid, None)


def status(conf: RunConf) -> dict[str, Any]:
    """Return a run's state: up, pid, memory used / capacity, channels, clients, engine, addresses.

    For a multi-node run the top level is node 0's, with ``used_memory`` and
    ``clients`` summed over the nodes that answer, ``up`` true only when every
    node's server runs, and ``nodes``: one :func:`cluster.node_status` per node.
    """
    if conf.nodes:
        whole = status(conf.node(0))
        nodes = [cluster.node_status(conf, k) for k in range(len(conf.nodes))]
        whole.update(up=all(n["up"] for n in nodes), nodes=nodes,
                     used_memory=sum(n["used_memory"] or 0 for n in nodes) if any(n["up"] for n in nodes) else None,
                     clients=sum(n["clients"] or 0 for n in nodes) if any(n["up"] for n in nodes) else None)
        return whole
    info: dict[str, Any] = dict(
        id=conf.id, up=pid_alive(conf.pid, conf.server), pid=conf.pid, host=conf.host, port=conf.port,
        socket=conf.socket, channels=conf.channels, capacity=conf.capacity, bfs_root=conf.bfs_root,
        align=conf.align, server=conf.server, used_memory=None, clients=None, engine=None,
    )
    if info["up"]:
        client = connect_redis(conf)  # the ranks' user may run INFO: status needs no admin password
        try:
            stats = client.info()
        finally:
            client.close()
        info["used_memory"] = stats.get("used_memory")
        info["clients"] = max(0, int(stats.get("connected_clients", 1)) - 1)  # not counting ourselves
        name = stats.get("server_name") or "redis"
        info["engine"] = f"{name} {stats.get(f'{name}_version') or stats.get('redis_version')}"
    return info
