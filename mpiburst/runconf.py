"""Run IDs, the names of a run's files, and the secure run conf file.

A *run* is one tier started for one job. Its ID comes from ``--id``, else
``$MPIBURST_ID``, else the batch system's job ID (``$SLURM_JOB_ID``,
``$PBS_JOBID``), else ``default`` (not unique: a later run with the same ID in
the same directory replaces it). Every file a run makes in its directory is
named after the ID:

* ``mpiburst_<id>.conf``  how clients connect (JSON, holds the passwords)
* ``redis_<id>.conf``     the server's generated configuration
* ``redis_<id>.rdb``      the server's snapshot (only when saved)
* ``redis_<id>.log``      the server's log
* ``.mpiburst_<id>/``     a 0700 directory holding the server's unix socket

Files holding secrets are written 0600 from the first byte (a temporary file
opened with ``O_EXCL`` in the same directory, then renamed) and are read the
way ssh reads a private key: refused when group/world-accessible, owned by
someone else, a symlink, truncated, or missing its password.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

#: Characters a run ID may contain (it becomes part of file names).
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
#: Environment variables consulted, in order, when no ID is given.
ID_ENV_VARS = ("MPIBURST_ID", "SLURM_JOB_ID", "PBS_JOBID")
DEFAULT_ID = "default"


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


def server_conf_path(directory: str, run_id: str) -> str:
    """Return the path of the generated server config ``redis_<id>.conf``."""
    return os.path.join(directory, f"redis_{run_id}.conf")


def rdb_name(run_id: str) -> str:
    """Return the file name of the server's snapshot, ``redis_<id>.rdb``."""
    return f"redis_{run_id}.rdb"


def log_name(run_id: str) -> str:
    """Return the file name of the server's log, ``redis_<id>.log``."""
    return f"redis_{run_id}.log"


def engine_log_name(run_id: str) -> str:
    """Return the file name of the automatic engine's log of run ``run_id``."""
    return f"mpiburst_{run_id}.engine.log"


def socket_dir_path(directory: str, run_id: str, socket_dir: str | None = None) -> str:
    """Return the 0700 directory for the unix socket: ``socket_dir`` or ``DIR/.mpiburst_<id>``."""
    return os.path.abspath(socket_dir) if socket_dir else os.path.join(directory, f".mpiburst_{run_id}")


def new_password() -> str:
    """Return a fresh random password of 256 bits (64 hex characters)."""
    return secrets.token_hex(32)


@dataclass
class RunConf:
    """Everything a client needs to reach a run's tier, stored as JSON in ``mpiburst_<id>.conf``.

    ``pid`` is the server's process ID (``None`` once a run was stopped with its
    snapshot saved: the conf is kept so ``--restart`` knows the channel count).
    """

    id: str
    dir: str
    host: str
    port: int
    socket: str
    user: str
    password: str
    admin_user: str
    admin_password: str
    channels: int
    bfs_root: str
    capacity: int
    align: int
    pid: int | None
    server: str
    engine_pid: int | None = None
    sync_threshold: float = 0.5
    purge_threshold: float = 0.8

    @property
    def path(self) -> str:
        """The path of this run's conf file."""
        return conf_path(self.dir, self.id)

    def to_json(self) -> str:
        """Return the conf as a JSON document."""
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "run conf") -> "RunConf":
        """Build a conf from a mapping, refusing one without passwords or with missing fields."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} is not a JSON object; start the run again with 'mpiburst start'.")
        for key in ("password", "admin_password"):
            if not data.get(key):
                raise ConfigError(f"{source} has no {key.replace('_', ' ')}; start the run again with 'mpiburst start'.")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}; start the run again with 'mpiburst start'.")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self) -> None:
        """Write the conf to :attr:`path` securely (0600 from the first byte, atomic replace)."""
        write_secure(self.path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "RunConf":
        """Read and check the conf file at ``path`` (see :func:`read_secure`)."""
        text = read_secure(path)
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigError(
                f"run conf {path} is truncated or not valid JSON; stop the run and start it again."
            ) from None
        return cls.from_dict(data, source=f"run conf {path}")


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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_secure(path: str) -> str:
    """Return the text of a secret-holding file after ssh-like checks.

    Raises
    ------
    ConfigError
        If the file is missing, a symlink, not a regular file, owned by another
        user, or readable or writable by group or others.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(
            f"no run conf {path}; check the run ID and --dir, or start the run with 'mpiburst start'."
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"run conf {path} is a symlink; refusing to read it, use the real file.")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read run conf {path} ({exc.strerror}).") from None
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"run conf {path} is not a regular file; refusing to read it.")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"run conf {path} is owned by uid {st.st_uid}, not by you; refusing to read it."
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"run conf {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"refusing to read it: its password may be known, stop the run and start it again."
            )
        return f.read()


def find_conf_path(run_id: str | None = None, directory: str | None = None) -> str:
    """Return the conf path of a run: ``--id``/``--dir`` if given, else ``$MPIBURST_CONF``, else ID rules in cwd."""
    if run_id is None and directory is None and os.environ.get("MPIBURST_CONF"):
        return os.environ["MPIBURST_CONF"]
    return conf_path(os.path.abspath(directory or os.getcwd()), resolve_id(run_id))
