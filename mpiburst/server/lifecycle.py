"""A run's lifecycle: start the server (config, socket directory, port, wait for PING), stop it, report it.

One ``redis-server`` or ``valkey-server`` runs per run ID, started by rank 0
(or ``mpiburst start``) and stopped by its own PID, never by name. The
passwords live in the 0600 ``mpiburst_<id>.conf`` and never on a command
line, in an environment or in a log; the server starts with umask 077 in its
own session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import redis

from ..align import detect_align
from ..errors import ConfigError, ServerError
from ..runconf import (RunConf, conf_path, create_private, engine_log_name, log_name, new_password, rdb_name,
                       resolve_id, server_conf_path, socket_dir_path, write_secure)
from . import process
from .config import ADMIN_USER, USER, render_config
from .connection import connect_redis
from .discovery import default_bind, find_server, host_address, free_port, parse_capacity
from .process import kill, log_tail, pid_alive, wait_gone

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
SOCKET_NAME = "redis.sock"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
PORT_ATTEMPTS = 5


def _remove(path: str) -> None:
    """Remove a file if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_socket_dir(path: str) -> None:
    """Create the socket directory with mode 0700, or check an existing one is ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create socket directory {path} ({exc.strerror}); choose another with --socket-dir.") from None
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(f"socket directory {path} is not a private directory of yours (mode 0700); remove it or use --socket-dir.")


def clean_run(conf: RunConf, keep_snapshot: bool) -> None:
    """Remove a stopped run's files: socket, server config, logs, and (unless kept) conf and snapshot."""
    sockdir = os.path.dirname(conf.socket)
    _remove(conf.socket)
    try:
        os.rmdir(sockdir)
    except OSError:
        pass
    _remove(server_conf_path(conf.dir, conf.id))
    _remove(os.path.join(conf.dir, log_name(conf.id)))
    _remove(os.path.join(conf.dir, engine_log_name(conf.id)))
    if keep_snapshot:
        conf.pid = None
        conf.save()
    else:
        _remove(os.path.join(conf.dir, rdb_name(conf.id)))
        _remove(conf.path)


# ----------------------------------------------------------------------------- start

class _PortInUse(Exception):
    """The server could not bind its TCP port (another process took it)."""


def _launch(conf: RunConf, bind: str, maxclients: int, tied: bool) -> subprocess.Popen:
    """Write the server config, start the server and wait until an authenticated PING answers."""
    write_secure(server_conf_path(conf.dir, conf.id), render_config(conf, bind, maxclients))
    log = os.path.join(conf.dir, log_name(conf.id))
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        proc = subprocess.Popen([conf.server, server_conf_path(conf.dir, conf.id)], cwd=conf.dir,
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                umask=0o077, start_new_session=True, close_fds=True,
                                preexec_fn=process.die_with_parent if tied and sys.platform.startswith("linux") else None)
    except OSError as exc:
        raise ServerError(f"cannot run server {conf.server} ({exc.strerror}); give a working one with --server.") from None
    finally:
        os.close(log_fd)
    process._children[proc.pid] = proc
    conf.pid = proc.pid
    conf.save()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            process._children.pop(proc.pid, None)
            tail = log_tail(log)
            if "already in use" in tail:
                raise _PortInUse(tail)
            raise ServerError(f"the server of run {conf.id} exited during start-up (status {proc.returncode}); its log ends: {tail}")
        if os.path.exists(conf.socket):
            try:
                connect_redis(conf).close()
                return proc
            except ServerError:
                pass
        if time.monotonic() > deadline:
            kill(proc.pid, conf.server)
            raise ServerError(f"the server of run {conf.id} did not answer within {START_TIMEOUT:.0f} s; its log ends: {log_tail(log)}")
        time.sleep(0.05)


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
            clean_run(old, keep_snapshot=os.path.exists(os.path.join(directory, rdb_name(run_id))))
    rdb = os.path.join(directory, rdb_name(run_id))
    if restart and not os.path.exists(rdb):
        raise ConfigError(f"cannot restart run {run_id}: no snapshot {rdb}; start it without --restart.")
    if not restart and os.path.exists(rdb):
        raise ConfigError(
            f"run {run_id} has a saved snapshot {rdb}; reload it with --restart, or remove it with "
            f"'mpiburst stop --discard --id {run_id}'."
        )
    return old


def start_run(id: str | None = None, dir: str | None = None, channels: int | None = None,
              bfs_root: str | None = None, capacity: str | int | None = None, bind: str | None = None,
              port: int | None = None, socket_dir: str | None = None, server: str | None = None,
              align: str | int | None = None, restart: bool = False, maxclients: int | None = None,
              tied: bool = False) -> RunConf:
    """Start the server of a run and return its conf (already saved as ``mpiburst_<id>.conf``).

    Parameters are those of ``mpiburst start``; ``channels`` defaults to 1 (or the
    old run's count with ``restart``), ``dir`` and ``bfs_root`` to the current
    directory, ``capacity`` to 50% of node memory. With ``tied`` (what
    :meth:`mpiburst.tier.Tier.start` uses) the server gets SIGTERM when this
    process dies, so an aborted MPI job leaves no server behind; ``mpiburst
    start`` leaves it untied, as the command returns while the server runs.

    Raises
    ------
    ConfigError
        On a bad option, an unwritable directory, a live run with the same ID.
    ServerError
        If no server binary is found or the server does not come up.
    """
    run_id = resolve_id(id, warn=True)
    directory = os.path.abspath(dir or os.getcwd())
    if not os.path.isdir(directory):
        raise ConfigError(f"run directory {directory} does not exist; create it or choose another with --dir.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {directory} is not writable; choose another with --dir.")
    old = _check_existing(directory, run_id, restart)
    if channels is None:
        channels = old.channels if old else 1
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"the number of channels must be a whole number of at least 1 (got {channels!r}).")
    bfs_root = os.path.abspath(bfs_root or (old.bfs_root if old else directory))
    if not os.path.isdir(bfs_root):
        raise ConfigError(f"BFS root {bfs_root} is not a directory; create it or give another with --bfs-root.")
    sockdir = socket_dir_path(directory, run_id, socket_dir)
    sock = os.path.join(sockdir, SOCKET_NAME)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"unix socket path {sock} is {len(os.fsencode(sock))} bytes, more than the OS allows "
            f"({MAX_SOCKET_PATH}); give a shorter directory with --socket-dir (e.g. under /tmp)."
        )
    if port is not None and not 0 < int(port) < 65536:
        raise ConfigError(f"port {port} is out of range; give 1-65535 or leave it out for a free one.")
    conf = RunConf(
        id=run_id, dir=directory, host="", port=0, socket=sock, user=USER, password=new_password(),
        admin_user=ADMIN_USER, admin_password=new_password(), channels=channels, bfs_root=bfs_root,
        capacity=parse_capacity(capacity), align=detect_align(bfs_root, align), pid=None,
        server=find_server(server),
    )
    bind = bind or default_bind()
    conf.host = host_address() if bind in ("0.0.0.0", "*") else bind
    maxclients = maxclients or max(1024, 4 * channels)
    _make_socket_dir(sockdir)
    log = os.path.join(directory, log_name(run_id))
    _remove(log)
    os.close(create_private(log))
    conf.save()
    try:
        for attempt in range(PORT_ATTEMPTS):
            try:
                conf.port = int(port) if (port and attempt == 0) else free_port(bind)
            except OSError as exc:
                raise ConfigError(f"cannot listen on address {bind!r} ({exc.strerror}); give another with --bind.") from None
            try:
                _launch(conf, bind, maxclients, tied)
                return conf
            except _PortInUse:
                continue
        raise ServerError(f"the server of run {run_id} found no free port after {PORT_ATTEMPTS} attempts; give one with --port.")
    except BaseException:
        if conf.pid:
            kill(conf.pid, conf.server)
        clean_run(conf, keep_snapshot=restart)
        if not restart:
            _remove(conf.path)
        raise


# ----------------------------------------------------------------------------- stop / status

def stop_run(conf: RunConf, save: bool = False, discard: bool = False, timeout: float = STOP_TIMEOUT) -> str:
    """Stop the run's server by its PID and remove its files; return a one-line report.

    With ``save``, the admin user runs SAVE (errors reported, server left
    running so nothing is lost), then SHUTDOWN NOSAVE; the snapshot and the
    conf stay for ``mpiburst start --restart``. With ``discard`` any snapshot is
    removed too. Without either, nothing is written and an older snapshot stays.

    Raises
    ------
    ConfigError
        If the run is not running and there is nothing to discard.
    ServerError
        If SAVE fails (the server keeps running).
    """
    if save and discard:
        raise ConfigError("choose either --save or --discard, not both.")
    rdb = os.path.join(conf.dir, rdb_name(conf.id))
    if not pid_alive(conf.pid, conf.server):
        if conf.pid is None and not discard:
            raise ConfigError(
                f"run {conf.id} is not running (its snapshot {rdb} is kept); restart it with "
                f"'mpiburst start --restart --id {conf.id}' or remove it with 'mpiburst stop --discard --id {conf.id}'."
            )
        was = "was stopped" if conf.pid is None else f"was not running (PID {conf.pid} gone)"
        clean_run(conf, keep_snapshot=os.path.exists(rdb) and not discard)
        return f"run {conf.id} {was}; its files were removed."
    _end_engine(conf.engine_pid)
    admin = connect_redis(conf, admin=True)
    try:
        if save:
            try:
                admin.save()
            except redis.RedisError as exc:
                raise ServerError(f"saving run {conf.id} failed ({exc}); the server keeps running, nothing was lost.") from None
        try:
            admin.shutdown(nosave=True)
        except redis.RedisError:
            pass  # the connection closes while the server exits; the PID check below decides
    finally:
        admin.close()
    if not wait_gone(conf.pid, conf.server, timeout):
        kill(conf.pid, conf.server)
    clean_run(conf, keep_snapshot=(save or os.path.exists(rdb)) and not discard)
    if save:
        return f"run {conf.id} stopped; snapshot saved in {rdb} (reload with 'mpiburst start --restart --id {conf.id}')."
    return f"run {conf.id} stopped."


def _end_engine(pid: int | None) -> None:
    """Stop the run's automatic engine by its PID and wait for it (SIGKILL after a while).

    The engine finishes the operation at hand on SIGTERM; it also exits by
    itself once the server is gone.
    """
    if not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(pid, None, STOP_TIMEOUT):
        kill(pid, None)


def status(conf: RunConf) -> dict[str, Any]:
    """Return a run's state: up, pid, memory used / capacity, channels, clients, engine, addresses."""
    info: dict[str, Any] = dict(
        id=conf.id, up=pid_alive(conf.pid, conf.server), pid=conf.pid, host=conf.host, port=conf.port,
        socket=conf.socket, channels=conf.channels, capacity=conf.capacity, bfs_root=conf.bfs_root,
        align=conf.align, server=conf.server, used_memory=None, clients=None, engine=None,
    )
    if info["up"]:
        admin = connect_redis(conf, admin=True)
        try:
            stats = admin.info()
        finally:
            admin.close()
        info["used_memory"] = stats.get("used_memory")
        info["clients"] = max(0, int(stats.get("connected_clients", 1)) - 1)  # not counting ourselves
        name = stats.get("server_name") or "redis"
        info["engine"] = f"{name} {stats.get(f'{name}_version') or stats.get('redis_version')}"
    return info
