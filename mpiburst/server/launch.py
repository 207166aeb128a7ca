"""Launching one server process: its private socket directory, its config, the process, the readiness check.

Used by :mod:`.lifecycle` (a run's one plain server) and :mod:`.cluster`
(one cluster-mode server per node of a multi-node run). The server starts
with umask 077 in its own session, its password hashes in a 0600 config, and
counts as started only once an authenticated PING answers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from ..errors import ConfigError, ServerError
from ..runconf import AdminCredentials, RunConf, log_name, server_conf_path, write_secure
from . import process
from .config import render_config
from .connection import connect_redis
from .process import kill, log_tail
from .tls import TlsFiles

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
SOCKET_NAME = "redis.sock"
START_TIMEOUT = 30.0


class PortInUse(Exception):
    """The server could not bind its TCP port (another process took it)."""


def remove_file(path: str) -> None:
    """Remove a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def make_socket_dir(path: str) -> None:
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


def launch(conf: RunConf, admin: AdminCredentials, bind: str, maxclients: int, tied: bool,
           member: str | None = None, cluster_port: int | None = None, tls: TlsFiles | None = None) -> subprocess.Popen:
    """Write the server config, start the server and wait until an authenticated PING answers.

    Parameters
    ----------
    conf
        The run's conf (its socket and port are the server's); saved with
        the server's PID as soon as it runs, except for a node's view.
    tied
        The server gets SIGTERM when this process dies.
    member
        The name part of the server's files (default: the run ID; ``<id>@<k>`` for node ``k``).
    cluster_port
        Run in cluster mode with the cluster bus on this port (a node of a multi-node run).
    tls
        The run's TLS files: the TCP port and the cluster bus use mutual TLS (see :mod:`.config`).

    Raises
    ------
    PortInUse
        If the server could not bind its port (the caller picks another).
    ServerError
        If the server cannot run, exits during start-up or does not answer.
    """
    member = member or conf.id
    label = f"run {conf.id}" if member == conf.id else f"node {member.rpartition('@')[2]} of run {conf.id}"
    config_path = server_conf_path(conf.dir, member)
    write_secure(config_path, render_config(conf, admin, bind, maxclients, member, cluster_port, tls))
    log = os.path.join(conf.dir, log_name(member))
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        proc = subprocess.Popen([conf.server, config_path], cwd=conf.dir,
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                umask=0o077, start_new_session=True, close_fds=True,
                                preexec_fn=process.die_with_parent if tied and sys.platform.startswith("linux") else None)
    except OSError as exc:
        raise ServerError(f"cannot run server {conf.server} ({exc.strerror}); give a working one with --server.") from None
    finally:
        os.close(log_fd)
    process.adopt(proc)
    conf.pid = proc.pid
    if cluster_port is None:
        conf.save()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            process.forget(proc.pid)
            tail = log_tail(log)
            if "already in use" in tail:
                raise PortInUse(tail)
            raise ServerError(f"the server of {label} exited during start-up (status {proc.returncode}); "
                              f"its log ends: {tail}")
        if os.path.exists(conf.socket):
            try:
                connect_redis(conf).close()
                return proc
            except ServerError:
                pass
        if time.monotonic() > deadline:
            kill(proc.pid, conf.server)
            raise ServerError(f"the server of {label} did not answer within {START_TIMEOUT:.0f} s; "
                              f"its log ends: {log_tail(log)}")
        time.sleep(0.05)
