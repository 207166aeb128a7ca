"""A Valkey/Redis server the site runs, named by URL: its conf from the URL and a 0600 credentials file, and the
check that it gives mpiburst what it needs.

``valkey://HOST:PORT`` or ``redis://HOST:PORT`` (query options:
``credentials=FILE``, default ``$MPIBURST_CREDENTIALS``; ``bfs_root=DIR``,
default the current directory; ``channels=N``, default 1; ``socket=PATH``, a
unix socket instead of TCP). The credentials file holds ``USER PASSWORD`` (or
only ``PASSWORD``, for the ``default`` user) on its first line and is refused
when group or others may read it: the password is never in the URL, on a
command line or in the environment. TLS to a site server (``rediss://``) is
not supported yet.

What mpiburst needs of the server, checked at connect: ``maxmemory-policy
noeviction`` (any other policy lets the server drop a file's fragments the
BFS does not hold yet), and the rights of the ACL categories of a run's own
user (:data:`.config.USER_RULES`: read, write, keyspace, transactions,
scripts, INFO). No engine runs beside such a server: syncs and purges happen
when the jobs ask for them.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import parse_qs, urlsplit

import redis

from ..align import detect_align
from ..errors import AuthenticationError, ConfigError, ServerError
from ..runconf import RunConf
from .config import USER_RULES

#: The URL schemes of a site's server.
SCHEMES = ("valkey", "redis", "rediss")
#: The environment variable naming the credentials file when the URL does not.
CREDENTIALS_ENV = "MPIBURST_CREDENTIALS"
#: The key the rights check writes and deletes (in mpiburst's own key space).
PROBE_KEY = "mpiburst:probe"
#: A script using the commands mpiburst's scripts use: it needs scripting and read/write rights.
PROBE_SCRIPT = "redis.call('SET', KEYS[1], '1'); redis.call('EXISTS', KEYS[1]); return redis.call('DEL', KEYS[1])"


def read_credentials(path: str) -> tuple[str, str]:
    """Return ``(user, password)`` from a credentials file that only its owner may read.

    Raises
    ------
    ConfigError
        If the file is missing, group/world-accessible, owned by another user or empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials file {path} ({exc.strerror}); give a readable one with "
                          f"?credentials=FILE or ${CREDENTIALS_ENV}.") from None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(f"the credentials file {path} is not a private file of yours (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}), so its password may be known; refusing it: "
                              f"'chmod 600 {path}' and change the password.")
        words = f.readline().split()
    if not words or len(words) > 2:
        raise ConfigError(f"the credentials file {path} does not hold 'USER PASSWORD' or 'PASSWORD' on its first "
                          f"line; write them there.")
    return (words[0], words[1]) if len(words) == 2 else ("default", words[0])


def site_conf(url: str) -> RunConf:
    """Return the conf (never saved) through which a process reaches the site's server at ``url``.

    Raises
    ------
    ConfigError
        On a malformed URL, ``rediss://``, or an unusable credentials file.
    """
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        raise ConfigError("TLS to a site's server (rediss://) is not supported yet; reach it over a unix socket "
                          "or a private network with valkey://HOST:PORT.")
    if parts.username or parts.password:
        raise ConfigError("a tier URL must not carry a user or password (it would show in process lists); put "
                          "them in a 0600 credentials file given with ?credentials=FILE.")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    sock = query.get("socket", "")
    try:
        port = parts.port or (0 if sock else 6379)
        channels = int(query.get("channels", "1"))
    except ValueError:
        raise ConfigError(f"tier URL {url!r} has a port or channel count that is not a number; fix it.") from None
    if not (parts.hostname or sock) or channels < 1:
        raise ConfigError(f"tier URL {url!r} needs a host (valkey://HOST:PORT) or ?socket=PATH, and at least 1 "
                          f"channel; fix it.")
    cred = query.get("credentials") or os.environ.get(CREDENTIALS_ENV)
    if not cred:
        raise ConfigError(f"no credentials file for {parts.scheme}://{parts.netloc}; give a 0600 file holding "
                          f"'USER PASSWORD' with ?credentials=FILE or ${CREDENTIALS_ENV}.")
    user, password = read_credentials(cred)
    bfs_root = os.path.abspath(query.get("bfs_root") or os.getcwd())
    if not os.path.isdir(bfs_root):
        raise ConfigError(f"BFS root {bfs_root} is not a directory; give another with ?bfs_root=DIR.")
    name = "".join(c if c.isalnum() else "_" for c in f"site_{parts.hostname or 'socket'}_{port}")
    return RunConf(id=name, dir=os.getcwd(), host=parts.hostname or "", port=port, socket=sock, user=user,
                   password=password, channels=channels, bfs_root=bfs_root, capacity=0,
                   align=detect_align(bfs_root, None), pid=None, server="site")


def check(client: redis.Redis, conf: RunConf) -> None:
    """Check that the site's server gives mpiburst what it needs; set ``conf.capacity`` from its ``maxmemory``.

    Raises
    ------
    ConfigError
        If the server's eviction policy is not ``noeviction``, or its user
        lacks a right mpiburst's commands and scripts need.
    """
    where = f"{conf.host}:{conf.port}" if conf.port else conf.socket
    try:
        memory = client.info("memory")
        client.eval(PROBE_SCRIPT, 1, PROBE_KEY)
    except redis.exceptions.NoPermissionError as exc:
        raise ConfigError(f"user {conf.user} of the server at {where} lacks a right mpiburst needs ({exc}); grant "
                          f"it the ACL rules '{USER_RULES}'.") from None
    except redis.RedisError as exc:
        raise ServerError(f"the server at {where} failed the check of what mpiburst needs ({exc}).") from None
    policy = memory.get("maxmemory_policy")
    if policy != "noeviction":
        raise ConfigError(f"the server at {where} has maxmemory-policy {policy}, which lets it evict data the BFS "
                          f"does not hold yet; mpiburst needs 'maxmemory-policy noeviction'.")
    conf.capacity = int(memory.get("maxmemory") or 0) or int(memory.get("total_system_memory") or 0)


def refused(conf: RunConf, exc: AuthenticationError) -> ConfigError:
    """Return the error for a site's server that refused the credentials ``exc`` reports (instead of the run's)."""
    where = f"{conf.host}:{conf.port}" if conf.port else conf.socket
    return ConfigError(f"the server at {where} refused user {conf.user} with the password in the credentials file; "
                       f"check the file.")
