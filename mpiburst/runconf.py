"""Run IDs, the names of a run's files, and the secure run conf file.

A *run* is one tier started for one job. Its ID comes from ``--id``, else
``$MPIBURST_ID``, else the batch system's job ID (``$SLURM_JOB_ID``,
``$PBS_JOBID``), else ``default`` (not unique: a later run with the same ID in
the same directory replaces it). Every file a run makes in its directory is
named after the ID:

* ``mpiburst_<id>.conf``  how ranks connect (JSON, holds the ranks' password)
* ``mpiburst_<id>.admin`` the admin user's password (lifecycle commands only)
* ``redis_<id>.conf``     the server's generated configuration
* ``redis_<id>.rdb``      the server's snapshot (only when saved)
* ``redis_<id>.log``      the server's log
* ``.mpiburst_<id>/``     a 0700 directory holding the server's unix socket
* ``.mpiburst_<id>.lock`` held while the run is started (and during ``mpiburst run``)
* ``.mpiburst_<id>.tls/``  a 0700 directory holding a multi-node run's TLS files (see :mod:`mpiburst.server.tls`)

A run spanning several nodes has one server per node (:attr:`RunConf.nodes`);
node ``k``'s server files carry ``<id>@<k>`` instead of ``<id>`` (``@`` is
not allowed in an ID, so no run's names collide with a node's), plus the
cluster state file ``nodes_<id>@<k>.conf`` the server writes itself, and,
when the nodes were started one at a time (a site prolog), the 0600 entry
``mpiburst_<id>@<k>.node`` each node wrote for node 0.

Files holding secrets are written 0600 from the first byte (a temporary file
opened with ``O_EXCL`` in the same directory, then renamed) and are read the
way ssh reads a private key: refused when group/world-accessible, owned by
someone else, a symlink, truncated, or missing its password.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import platform
import re
import secrets
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

#: Characters a run ID may contain (it becomes part of file names).
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
#: Environment variables consulted, in order, when no ID is given.
ID_ENV_VARS = ("MPIBURST_ID", "SLURM_JOB_ID", "PBS_JOBID")
DEFAULT_ID = "default"
#: A run conf is a few hundred bytes; anything far larger is not one.
MAX_CONF_BYTES = 1 << 16


def validate_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe to use in file names, else raise :class:`ConfigError`."""
    if not run_id or not ID_PATTERN.match(run_id) or run_id in (".", ".."):
        raise ConfigError(
            f"run ID {run_id!r} is not usable in file names; use only letters, digits, '.', '_' and '-'."
        )
    return run_id


def resolve_id(explicit: str | None = None, *, warn: bool = False) -> str:
    """Return the run ID: ``explicit``, else the first set variable of :data:`ID_ENV_VARS`, else ``default``.

    Parameters
    ----------
    explicit
        The ID given on the command line or to the API (``--id``), if any.
    warn
        Print a warning on stderr when falling back to the non-unique ``default``
        (starting a run does; looking one up does not).
    """
    if explicit:
        return validate_id(explicit)
    for var in ID_ENV_VARS:
        value = os.environ.get(var)
        if value:
            return validate_id(value)
    if warn:
        print(
            "mpiburst: warning: no run ID given (--id, MPIBURST_ID, SLURM_JOB_ID, PBS_JOBID); "
            "using 'default', which is not unique: another run with that ID in the same directory replaces this one.",
            file=sys.stderr,
        )
    return DEFAULT_ID


def conf_path(directory: str, run_id: str) -> str:
    """Return the path of the client conf file ``mpiburst_<id>.conf`` in ``directory``."""
    return os.path.join(directory, f"mpiburst_{run_id}.conf")


def node_member(run_id: str, node: int | None) -> str:
    """Return the name part of node ``node``'s server files: ``<id>@<node>`` (``run_id`` itself for None)."""
    return run_id if node is None else f"{run_id}@{node}"


def replica_member(run_id: str, node: int) -> str:
    """Return the name part of the files of node ``node``'s replica server: ``<id>@<node>.replica``."""
    return f"{run_id}@{node}.replica"


def cluster_conf_name(member: str) -> str:
    """Return the file name of a cluster-mode server's own state file, ``nodes_<member>.conf``."""
    return f"nodes_{member}.conf"


def node_entry_path(directory: str, run_id: str, index: int) -> str:
    """Return the path of node ``index``'s entry file ``mpiburst_<id>@<index>.node`` (a run started node by node)."""
    return os.path.join(directory, f"mpiburst_{node_member(run_id, index)}.node")


def server_conf_path(directory: str, run_id: str) -> str:
    """Return the path of the generated server config ``redis_<id>.conf``."""
    return os.path.join(directory, f"redis_{run_id}.conf")


def lock_path(directory: str, run_id: str) -> str:
    """Return the path of the start lock ``.mpiburst_<id>.lock`` (see :mod:`mpiburst.server.runlock`)."""
    return os.path.join(directory, f".mpiburst_{run_id}.lock")


def admin_path(directory: str, run_id: str) -> str:
    """Return the path of the admin credentials ``mpiburst_<id>.admin`` (lifecycle commands only)."""
    return os.path.join(directory, f"mpiburst_{run_id}.admin")


def rdb_name(run_id: str) -> str:
    """Return the file name of the server's snapshot, ``redis_<id>.rdb``."""
    return f"redis_{run_id}.rdb"


def log_name(run_id: str) -> str:
    """Return the file name of the server's log, ``redis_<id>.log``."""
    return f"redis_{run_id}.log"


def engine_log_name(run_id: str) -> str:
    """Return the file name of the automatic engine's log of run ``run_id``."""
    return f"mpiburst_{run_id}.engine.log"


def tls_dir_path(directory: str, run_id: str) -> str:
    """Return the 0700 directory of a multi-node run's CA certificate and node certificate and key."""
    return os.path.join(directory, f".mpiburst_{run_id}.tls")


def socket_dir_path(directory: str, run_id: str, socket_dir: str | None = None) -> str:
    """Return the 0700 directory for the unix socket: ``socket_dir`` or ``DIR/.mpiburst_<id>``."""
    return os.path.abspath(socket_dir) if socket_dir else os.path.join(directory, f".mpiburst_{run_id}")


def new_password() -> str:
    """Return a fresh random password of 256 bits (64 hex characters)."""
    return secrets.token_hex(32)


@dataclass
class RunConf:
    """Everything a rank needs to reach a run's tier, stored as JSON in ``mpiburst_<id>.conf``.

    It holds the ranks' credentials only; the admin user's (SAVE, SHUTDOWN)
    live in the separate ``mpiburst_<id>.admin`` (:class:`AdminCredentials`),
    read only by the lifecycle commands. ``pid`` is the server's process ID
    (``None`` once a run was stopped with its snapshot saved: the conf is kept
    so ``--restart`` knows the channel count).
    """

    id: str
    dir: str
    host: str
    port: int
    socket: str
    user: str
    password: str
    channels: int
    bfs_root: str
    capacity: int
    align: int
    pid: int | None
    server: str
    engine_pid: int | None = None
    sync_threshold: float = 0.5
    purge_threshold: float = 0.8
    #: One entry per node of a multi-node run, in node order (empty: one plain server):
    #: ``{"host", "port", "socket", "pid", "ranks": [lo, hi), "slots": [first, last], "hostname", "bus_port"}``.
    #: ``host``/``port``/``socket``/``pid`` above are node 0's.
    nodes: list = field(default_factory=list)
    #: TCP connections to the servers use mutual TLS with the run's certificates (``.mpiburst_<id>.tls/``);
    #: False on a multi-node run means plaintext on a network its user declared private (``--trust-network``).
    tls: bool = False
    #: Copies of each node's data on another node (0 or 1): with 1, ``nodes[k]["replica"]`` is the entry
    #: (``host``, ``port``, ``socket``, ``pid``, ``hostname``, ``bus_port``) of node k's replica, on node k+1 mod n.
    replicas: int = 0
    #: A site's server reached over TLS (``rediss://``, :mod:`mpiburst.server.site`): the paths of the CA to check it
    #: against (``""``: the system's trust store) and of the client's certificate and key (``""``: none). Empty:
    #: not a site's TLS server.
    site_tls: dict = field(default_factory=dict)

    def node(self, index: int) -> RunConf:
        """Return the single-server view of node ``index`` (its address, socket and PID; never saved).

        What a connection to, or a status of, one node's server needs. The
        unix socket is only the view's when the node's server runs on this
        host: another host's socket may show on a shared filesystem, but
        only TCP (mutual TLS) reaches that server.
        """
        return self._server_view(self.nodes[index], index)

    def replica(self, index: int) -> RunConf | None:
        """Return the single-server view of node ``index``'s replica (on the next node), or None without one."""
        entry = self.nodes[index].get("replica") if index < len(self.nodes) else None
        return self._server_view(entry, index) if isinstance(entry, dict) else None

    def _server_view(self, entry: dict, index: int) -> RunConf:
        """Return the view of the server of ``entry``: its unix socket only when it runs on this host."""
        here = entry.get("hostname", platform.node()) == platform.node()
        return self.view(entry["host"], entry["port"], entry["socket"] if here else "", entry["pid"], index)

    def view(self, host: str, port: int, socket: str, pid: int | None, node: int) -> RunConf:
        """Return a copy of this conf for one node's server at ``host:port`` / ``socket`` (its :meth:`save` refuses)."""
        view = dataclasses.replace(self, host=host, port=port, socket=socket, pid=pid, nodes=[])
        view._view_of = node  # type: ignore[attr-defined]
        return view

    @property
    def node_count(self) -> int:
        """The number of servers of the run (1 for a plain run)."""
        return max(1, len(self.nodes))

    @property
    def path(self) -> str:
        """The path of this run's conf file."""
        return conf_path(self.dir, self.id)

    def to_json(self) -> str:
        """Return the conf as a JSON document."""
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "run conf") -> RunConf:
        """Build a conf from a mapping, refusing one without a password, with missing or wrongly typed fields."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} is not a JSON object; start the run again with 'mpiburst start'.")
        if not data.get("password"):
            raise ConfigError(f"{source} has no password; start the run again with 'mpiburst start'.")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}; start the run again with 'mpiburst start'.")
        fields = {k: v for k, v in data.items() if k in names}
        for name, value in fields.items():
            if not _has_type(value, _FIELD_TYPES[name]):
                raise ConfigError(f"{source} has a wrong {name} ({value!r:.40}); it was not written by mpiburst: "
                                  f"remove it and start the run again.")
        for node in fields.get("nodes", []):
            if not _is_node(node):
                raise ConfigError(f"{source} has a wrong node entry ({node!r:.60}); it was not written by mpiburst: "
                                  f"remove it and start the run again.")
        return cls(**fields)

    def save(self) -> None:
        """Write the conf to :attr:`path` securely (0600 from the first byte, atomic replace)."""
        if hasattr(self, "_view_of"):
            raise ConfigError(f"node {self._view_of}'s view of run {self.id} cannot be saved; this is a "
                              f"bug in mpiburst, please report it.")
        write_secure(self.path, self.to_json())

    @classmethod
    def load(cls, path: str, exposed_ok: bool = False) -> RunConf:
        """Read and check the conf file at ``path`` (see :func:`read_secure`)."""
        data = parse_json(read_secure(path, exposed_ok=exposed_ok), path)
        return cls.from_dict(data, source=f"run conf {path}")


#: JSON types each RunConf field may hold (None where the field is optional).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **{name: (str,) for name in ("id", "dir", "host", "socket", "user", "password", "bfs_root", "server")},
    **{name: (int,) for name in ("port", "channels", "capacity", "align")},
    "pid": (int, type(None)), "engine_pid": (int, type(None)),
    "sync_threshold": (int, float), "purge_threshold": (int, float), "nodes": (list,), "tls": (bool,),
    "replicas": (int,), "site_tls": (dict,),
}

#: The fields of a node entry and their JSON types.
_NODE_TYPES: dict[str, tuple[type, ...]] = {"host": (str,), "port": (int,), "socket": (str,), "pid": (int, type(None)),
                                           "ranks": (list,), "slots": (list,)}


def _is_node(entry: Any) -> bool:
    """Return True if ``entry`` is a well-formed node entry of :attr:`RunConf.nodes`."""
    if not isinstance(entry, dict) or not all(_has_type(entry.get(k), t) for k, t in _NODE_TYPES.items()):
        return False
    return all(len(entry[k]) == 2 and all(_has_type(v, (int,)) for v in entry[k]) for k in ("ranks", "slots"))


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    """Return True if ``value`` is one of ``types`` (a bool is not a number here)."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


@dataclass
class AdminCredentials:
    """The admin user of a run's server (SAVE, SHUTDOWN), kept in the 0600 ``mpiburst_<id>.admin``.

    Only the lifecycle commands (``mpiburst stop``, ``mpiburst run`` ending
    its run, ``mem_io_stop``) read it; ranks and the engine never do.
    """

    user: str
    password: str

    @staticmethod
    def path_of(conf: RunConf) -> str:
        """Return the admin file's path for ``conf``'s run."""
        return admin_path(conf.dir, conf.id)

    def save(self, conf: RunConf) -> None:
        """Write the credentials next to ``conf`` (0600 from the first byte)."""
        write_secure(self.path_of(conf), json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def load(cls, conf: RunConf, exposed_ok: bool = False) -> AdminCredentials:
        """Read and check the admin file of ``conf``'s run."""
        path = cls.path_of(conf)
        data = parse_json(read_secure(path, "admin file", exposed_ok), path, "admin file")
        if not (isinstance(data, Mapping) and isinstance(data.get("user"), str)
                and isinstance(data.get("password"), str) and data["password"]):
            raise ConfigError(f"admin file {path} has no user and password; stop the run (the server's PID is in "
                              f"{conf.path}) and start it again.")
        return cls(data["user"], data["password"])


def create_private(path: str) -> int:
    """Create ``path`` exclusively with mode 0600 and return its open file descriptor.

    Raises
    ------
    ConfigError
        If the file exists already or the directory is not writable.
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already; remove it or choose another run ID.") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create {path} ({exc.strerror}); choose a writable directory with --dir."
        ) from None


def write_secure(path: str, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte, replacing it atomically.

    The bytes go to a temporary file created with ``O_EXCL`` in the same
    directory, which is then renamed over ``path``: a reader sees the old
    or the new file, never a partial one, and never a readable one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = create_private(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_secure(path: str, what: str = "run conf", exposed_ok: bool = False) -> str:
    """Return the text of a secret-holding file after ssh-like checks, without ever blocking.

    The file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with
    ``fstat`` before a byte is read, so a symlink, a FIFO, a device or a
    directory planted at ``path`` is refused at once instead of followed or
    waited on.

    Parameters
    ----------
    what
        What the file is, for messages (``run conf``, ``admin file``).
    exposed_ok
        Accept a file group or others may access (``mpiburst stop`` does: its
        password may be known, and stopping the run is the cure).

    Raises
    ------
    ConfigError
        If the file is missing, a symlink, not a regular file, owned by another
        user, larger than :data:`MAX_CONF_BYTES`, or (unless ``exposed_ok``)
        accessible by group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"no {what} {path}; check the run ID and --dir, or start the run with 'mpiburst start'."
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path} is a symlink; refusing to read it, use the real file.") from None
        raise ConfigError(f"cannot read {what} {path} ({exc.strerror}).") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file; refusing to read it: remove it and "
                              f"start the run again.")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not by you; refusing to read it.")
        if st.st_mode & 0o077 and not exposed_ok:
            raise ConfigError(
                f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}), so its "
                f"password may be known; refusing to use it: stop the run with 'mpiburst stop' (which accepts "
                f"it) and start it again."
            )
        if st.st_size > MAX_CONF_BYTES:
            raise ConfigError(f"{what} {path} is {st.st_size} bytes, too large for a run conf; refusing to read it.")
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_CONF_BYTES:
                raise ConfigError(f"{what} {path} grew past {MAX_CONF_BYTES} bytes while read; refusing it.")
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


def parse_json(text: str, path: str, what: str = "run conf") -> Any:
    """Return the JSON document in ``text``, or raise :class:`ConfigError` naming ``path``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigError(
            f"{what} {path} is truncated or not valid JSON; stop the run and start it again."
        ) from None


def tiers_dir(create: bool = False) -> str:
    """Return the user's directory of named tiers: ``$MPIBURST_TIERS_DIR``, else ``~/.mpiburst/tiers``.

    Each named tier (``mpiburst create NAME``) is a run whose ID is its name,
    with its files in ``<tiers>/NAME/``. The directory is the user's own,
    mode 0700 (made so with ``create``); one that group or others can enter,
    or that another user owns, is refused, as its tiers' passwords could be read.

    Raises
    ------
    ConfigError
        If the directory is not private to the user, or cannot be created.
    """
    path = os.path.abspath(os.environ.get("MPIBURST_TIERS_DIR") or os.path.expanduser("~/.mpiburst/tiers"))
    if create and not os.path.isdir(path):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the named tiers' directory {path} ({exc.strerror}); set "
                              f"MPIBURST_TIERS_DIR to a private directory of yours.") from None
    if os.path.isdir(path):
        st = os.lstat(path)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"the named tiers' directory {path} is not private to you (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}); make it yours with "
                              f"'chmod 700 {path}'.")
    return path


def named_dir(name: str, create: bool = False) -> str:
    """Return the directory of named tier ``name``: ``<tiers>/NAME`` (see :func:`tiers_dir`)."""
    return os.path.join(tiers_dir(create), validate_id(name))


def find_conf_path(run_id: str | None = None, directory: str | None = None) -> str:
    """Return the conf path of a run: ``--id``/``--dir`` if given, else ``$MPIBURST_CONF``, else ID rules in cwd."""
    if run_id is None and directory is None and os.environ.get("MPIBURST_CONF"):
        return os.environ["MPIBURST_CONF"]
    return conf_path(os.path.abspath(directory or os.getcwd()), resolve_id(run_id))
