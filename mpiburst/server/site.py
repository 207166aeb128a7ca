"""A Valkey/Redis server the site runs, named by URL: its conf from the URL and a 0600 credentials file, and the
check that it gives mpiburst what it needs.

``valkey://HOST:PORT``, ``redis://HOST:PORT`` or, over TLS,
``rediss://HOST:PORT`` (query options: ``credentials=FILE``, default
``$MPIBURST_CREDENTIALS``; ``bfs_root=DIR``, default the current directory;
``channels=N``, default 1; ``socket=PATH``, a unix socket instead of TCP;
``ca=FILE``, ``cert=FILE``, ``key=FILE`` for TLS; ``trust_network=1``;
``sync_threshold=F``, ``purge_threshold=F``, for an engine run beside it). The
credentials file holds ``USER PASSWORD`` (or only ``PASSWORD``, for the
``default`` user) on its first line and is refused when group or others may
read it: the password is never in the URL, on a command line or in the
environment. Its further lines may name the TLS files (``ca=FILE``,
``cert=FILE``, ``key=FILE``); the URL's win.

TLS (``rediss://``) checks the server's certificate against ``ca`` (default:
the system's trust store) and its host name against the URL's host; with
``cert`` and ``key`` (a private file, as the credentials) the client shows
its own certificate, for servers with ``tls-auth-clients yes``. Plaintext
(``valkey://``, ``redis://``) is refused to a host that is not this one's
loopback, since the password and the data would cross the network in clear
(docs/security.md), unless ``trust_network=1`` or
``$MPIBURST_TRUST_NETWORK`` states that the network is private.

What mpiburst needs of the server, checked at connect: ``maxmemory-policy
noeviction`` (any other policy lets the server drop a file's fragments the
BFS does not hold yet), and the rights of the ACL categories of a run's own
user (:data:`.config.USER_RULES`: read, write, keyspace, transactions,
scripts, INFO). No engine runs beside such a server unless its user runs
one (``python -m mpiburst.engine --tier URL``): without it queued
(non-blocking) syncs and prestages wait, and no threshold applies. A server in cluster mode is one node of a site's cluster:
:func:`open_site` finds its primaries (:func:`cluster_nodes`) and checks
each. No engine runs beside such a server: syncs and purges happen
when the jobs ask for them.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import stat
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.crc import key_slot

from ..align import detect_align
from ..errors import AuthenticationError, ConfigError, ServerError
from ..nodes import world_rank
from ..runconf import RunConf
from ..store import ClusterStore, RedisStore, Store
from .config import USER_RULES
from .connection import connect_redis
from .tls import trust_network_from_env

#: The URL schemes of a site's server.
SCHEMES = ("valkey", "redis", "rediss")
#: The environment variable naming the credentials file when the URL does not.
CREDENTIALS_ENV = "MPIBURST_CREDENTIALS"
#: The TLS files a site URL or credentials file may name: the CA to check the server against, the client's own
#: certificate and key.
TLS_FILES = ("ca", "cert", "key")
#: The key the rights check writes and deletes (in mpiburst's own key space).
PROBE_KEY = "mpb:probe"
#: The URL's engine thresholds (fractions of a server's maxmemory) and their defaults, a run's.
THRESHOLDS = {"sync_threshold": 0.5, "purge_threshold": 0.8}
#: The hash slots of a Valkey/Redis cluster.
SLOTS = 16384
#: Every how many slots a site's cluster is asked who owns the slot (:func:`cluster_nodes`).
PROBE_STRIDE = 16
#: A script using the commands mpiburst's scripts use: it needs scripting and read/write rights.
PROBE_SCRIPT = "redis.call('SET', KEYS[1], '1'); redis.call('EXISTS', KEYS[1]); return redis.call('DEL', KEYS[1])"


def _open_private(path: str, what: str, option: str) -> int:
    """Open ``path`` for reading, refusing it unless it is a regular file of this user that only they may read.

    Raises
    ------
    ConfigError
        If it is missing, not a regular file, another user's, or group/world-accessible.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path} ({exc.strerror}); give a readable one with "
                          f"{option}.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise ConfigError(f"the {what} {path} is not a private file of yours (mode {stat.S_IMODE(st.st_mode):04o}), "
                          f"so its secret may be known; refusing it: 'chmod 600 {path}' and replace the secret.")
    return fd


def read_credentials(path: str) -> tuple[str, str, dict[str, str]]:
    """Return ``(user, password, tls)`` from a credentials file that only its owner may read.

    ``tls`` holds the TLS files its further lines name (``ca=FILE``, ``cert=FILE``, ``key=FILE``; a relative
    name is taken from the credentials file's directory, wherever the job runs).

    Raises
    ------
    ConfigError
        If the file is missing, group/world-accessible, owned by another user, empty, or has a line that is
        none of these.
    """
    fd = _open_private(path, "credentials file", f"?credentials=FILE or ${CREDENTIALS_ENV}")
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        words = f.readline().split()
        rest = [line.strip() for line in f.read(1 << 16).splitlines() if line.strip()]
    if not words or len(words) > 2:
        raise ConfigError(f"the credentials file {path} does not hold 'USER PASSWORD' or 'PASSWORD' on its first "
                          f"line; write them there.")
    tls: dict[str, str] = {}
    for line in rest:
        name, eq, value = line.partition("=")
        if not eq or name.strip() not in TLS_FILES or not value.strip():
            raise ConfigError(f"the credentials file {path} has a line {line[:40]!r} that is not ca=FILE, cert=FILE "
                              f"or key=FILE; fix it.")
        tls[name.strip()] = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(value.strip()))
    user, password = (words[0], words[1]) if len(words) == 2 else ("default", words[0])
    return user, password, tls


def is_loopback(host: str) -> bool:
    """Return True if every address ``host`` resolves to is this host's loopback (127.0.0.0/8, ::1).

    Raises
    ------
    ConfigError
        If the name does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"the host {host!r} of the tier URL does not resolve ({exc}); fix the URL.") from None
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _tls_files(scheme: str, query: dict[str, str], listed: dict[str, str]) -> dict[str, str]:
    """Return the TLS files of a ``rediss://`` URL (the query's, else the credentials file's), checked; {} otherwise."""
    named = {k: os.path.abspath(os.path.expanduser(v)) for k, v in {**listed, **query}.items() if k in TLS_FILES and v}
    if scheme != "rediss":
        if named:
            raise ConfigError(f"the tier URL names TLS files ({', '.join(sorted(named))}) but its scheme is "
                              f"{scheme}://, which is plaintext; use rediss://HOST:PORT.")
        return {}
    if ("cert" in named) != ("key" in named):
        raise ConfigError("a client certificate needs its key and a key its certificate; give both cert=FILE and "
                          "key=FILE, or neither.")
    for what, path in named.items():
        if what == "key":
            os.close(_open_private(path, "TLS key", "key=FILE"))
        elif not os.path.isfile(path):
            raise ConfigError(f"the TLS {what} file {path} does not exist; fix {what}=FILE.")
    return {k: named.get(k, "") for k in TLS_FILES}


def site_conf(url: str) -> RunConf:
    """Return the conf (never saved) through which a process reaches the site's server at ``url``.

    Raises
    ------
    ConfigError
        On a malformed URL, an unusable credentials or TLS file, or plaintext to another host on a network
        not stated private.
    """
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigError("a tier URL must not carry a user or password (it would show in process lists); put "
                          "them in a 0600 credentials file given with ?credentials=FILE.")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    sock = query.get("socket", "")
    try:
        port = parts.port or (0 if sock else 6379)
        channels = int(query.get("channels", "1"))
        thresholds = [float(query.get(name, default)) for name, default in THRESHOLDS.items()]
    except ValueError:
        raise ConfigError(f"tier URL {url!r} has a port, channel count or threshold that is not a number; "
                          f"fix it.") from None
    if not all(0 < t <= 1 for t in thresholds):
        raise ConfigError(f"tier URL {url!r} has a threshold outside (0, 1]; give the fill at which the engine "
                          f"syncs or purges, as a fraction of the server's maxmemory.")
    if not (parts.hostname or sock) or channels < 1:
        raise ConfigError(f"tier URL {url!r} needs a host (valkey://HOST:PORT) or ?socket=PATH, and at least 1 "
                          f"channel; fix it.")
    if parts.scheme == "rediss" and (sock or not parts.hostname):
        raise ConfigError("rediss:// is TLS over TCP and needs a host (rediss://HOST:PORT), not ?socket=PATH; a "
                          "unix socket is reached with valkey://?socket=PATH.")
    cred = query.get("credentials") or os.environ.get(CREDENTIALS_ENV)
    if not cred:
        raise ConfigError(f"no credentials file for {parts.scheme}://{parts.netloc}; give a 0600 file holding "
                          f"'USER PASSWORD' with ?credentials=FILE or ${CREDENTIALS_ENV}.")
    user, password, listed = read_credentials(cred)
    tls = _tls_files(parts.scheme, query, listed)
    trusted = query.get("trust_network", "").lower() in ("1", "yes", "true") or trust_network_from_env()
    if not tls and not sock and parts.hostname and not trusted and not is_loopback(parts.hostname):
        raise ConfigError(f"{parts.scheme}://{parts.netloc} is plaintext to another host: the password and the data "
                          f"would cross the network in clear (docs/security.md); use rediss://{parts.netloc} "
                          f"with ?ca=FILE, or add ?trust_network=1 if the network is private to you.")
    bfs_root = os.path.abspath(query.get("bfs_root") or os.getcwd())
    if not os.path.isdir(bfs_root):
        raise ConfigError(f"BFS root {bfs_root} is not a directory; give another with ?bfs_root=DIR.")
    name = "".join(c if c.isalnum() else "_" for c in f"site_{parts.hostname or 'socket'}_{port}")
    return RunConf(id=name, dir=os.getcwd(), host=parts.hostname or "", port=port, socket=sock, user=user,
                   password=password, channels=channels, bfs_root=bfs_root, capacity=0,
                   align=detect_align(bfs_root, None), pid=None, server="site", site_tls=tls,
                   sync_threshold=thresholds[0], purge_threshold=thresholds[1])


def open_site(url: str) -> tuple[RunConf, Store, redis.Redis]:
    """Connect to the site's server or cluster at ``url``, check every server, and return the conf, store and client.

    A server in cluster mode (``INFO cluster``; ``?cluster=1`` demands one)
    is one of a cluster: its primaries are found (:func:`cluster_nodes`),
    each is connected to and checked, and the store is a
    :class:`~mpiburst.store.ClusterStore` over them whose writes go to the
    node of this process's MPI rank modulo their count (node 0 without one).

    Raises
    ------
    ConfigError
        On a bad URL or credentials, a server refusing them, or one lacking what mpiburst needs.
    ServerError
        If a server cannot be reached.
    """
    conf = site_conf(url)
    demanded = parse_qs(urlsplit(url).query).get("cluster", [""])[-1].lower() in ("1", "yes", "true")
    client = _connect(conf)
    try:
        try:
            cluster = client.info("cluster").get("cluster_enabled") == 1
        except redis.exceptions.NoPermissionError as exc:
            raise _lacks(conf, exc) from None
        except redis.RedisError as exc:
            raise ServerError(f"the server at {_where(conf)} failed the check of what mpiburst needs ({exc}).") from None
        if demanded and not cluster:
            raise ConfigError(f"the server at {_where(conf)} is not in cluster mode, but the URL says ?cluster=1; "
                              f"drop it, or name a node of the site's cluster.")
        if not cluster:
            conf.capacity = check(client, conf)
            return conf, RedisStore(client), client
        conf.nodes = cluster_nodes(client, conf)
    except BaseException:
        client.close()
        raise
    client.close()
    rank = world_rank()
    local = rank % len(conf.nodes) if rank is not None else None
    clients: list[redis.Redis] = []
    try:
        for k in range(len(conf.nodes)):
            clients.append(_connect(conf.node(k)))
        store = ClusterStore(clients, local)   # each node's tag asked of its server
        conf.capacity = sum(check(clients[k], conf.node(k), f"mpb:{{{tag}}}:probe") for k, tag in enumerate(store.tags))
    except BaseException:
        for node in clients:
            node.close()
        raise
    for entry, tag in zip(conf.nodes, store.tags):   # the slot of the node's tag: what slot_tag finds again
        entry["slots"] = [key_slot(tag.encode())] * 2
    return conf, store, clients[local or 0]


def _connect(conf: RunConf) -> redis.Redis:
    """Return a client of the site's server ``conf`` names, its errors said as a site's (a refused password, ...)."""
    try:
        return connect_redis(conf)
    except AuthenticationError:
        raise ConfigError(f"the server at {_where(conf)} refused user {conf.user} with the password in the "
                          f"credentials file; check the file.") from None
    except ServerError as exc:
        raise unreachable(conf, exc) from exc.__cause__


def _where(conf: RunConf) -> str:
    """Return a site server's address for messages."""
    return f"{conf.host}:{conf.port}" if conf.port else conf.socket


@functools.lru_cache(maxsize=1)
def probe_tags() -> tuple[tuple[int, str], ...]:
    """Return ``(slot, tag)`` for every :data:`PROBE_STRIDE`-th hash slot: a hash tag (``s<k>``) whose slot it is."""
    wanted = dict.fromkeys(range(0, SLOTS, PROBE_STRIDE), "")
    k = 0
    while not all(wanted.values()):
        slot = key_slot(f"s{k}".encode())
        if wanted.get(slot) == "":
            wanted[slot] = f"s{k}"
        k += 1
    return tuple(wanted.items())


def cluster_nodes(client: redis.Redis, conf: RunConf) -> list[dict[str, Any]]:
    """Return the primaries of the site's cluster ``client`` is a node of, as run conf node entries.

    Found with no CLUSTER right: one pipelined ``EXISTS`` for every
    :data:`PROBE_STRIDE`-th hash slot; the node answers for its own slots
    and names the owner of every other (``MOVED SLOT HOST:PORT``). A primary
    owning no probed slot (fewer than :data:`PROBE_STRIDE` slots in a row) is
    not used, which costs only its memory: every key mpiburst writes
    carries the tag of a slot its node was seen to own
    (:func:`mpiburst.store.cluster_store.node_tag`). The nodes are ordered
    by their first slot (node 0, which holds the file records, owns slot 0),
    so every process finds the same order whichever node its URL names.
    Each entry's ``slots`` is ``[s, s]`` for the first probed slot ``s`` its
    node owns (:func:`open_site` narrows it to its tag's slot).

    Raises
    ------
    ServerError
        If a probed slot is served by no node (the cluster is down), or the node fails otherwise.
    """
    pipe = client.pipeline(transaction=False)
    tags = probe_tags()
    for _, tag in tags:
        pipe.exists(f"mpb:{{{tag}}}:probe")
    try:
        replies = pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        raise ServerError(f"the site's server at {_where(conf)} failed while its cluster's nodes were looked up "
                          f"({exc}).") from None
    entries: dict[tuple[str, int], dict[str, Any]] = {}
    for (slot, _), reply in zip(tags, replies):
        if isinstance(reply, redis.exceptions.NoPermissionError):
            raise _lacks(conf, reply)
        if not isinstance(reply, Exception):
            owner = (conf.host, conf.port)
        elif isinstance(reply, redis.exceptions.AskError) or str(reply).startswith("MOVED "):
            host, _, port = str(reply).split()[-1].rpartition(":")   # "[MOVED ]SLOT HOST:PORT"
            owner = (host or conf.host, int(port))
        else:
            raise ServerError(f"the site's cluster at {_where(conf)} does not serve hash slot {slot} ({reply}); "
                              f"it must serve every slot before mpiburst can use it.")
        entries.setdefault(owner, dict(host=owner[0], port=owner[1], socket="", pid=None, ranks=[0, 0],
                                       slots=[slot, slot]))
    return list(entries.values())


def check(client: redis.Redis, conf: RunConf, probe: str = PROBE_KEY) -> int:
    """Check that a site's server gives mpiburst what it needs; return its capacity (``maxmemory``, else its RAM).

    ``probe``: the key the rights check writes and deletes (in a cluster, one of the node's slots).

    Raises
    ------
    ConfigError
        If the server's eviction policy is not ``noeviction``, or its user
        lacks a right mpiburst's commands and scripts need.
    ServerError
        If the server fails the check otherwise.
    """
    where = _where(conf)
    try:
        memory = client.info("memory")
        client.eval(PROBE_SCRIPT, 1, probe)
    except redis.exceptions.NoPermissionError as exc:
        raise _lacks(conf, exc) from None
    except redis.RedisError as exc:
        raise ServerError(f"the server at {where} failed the check of what mpiburst needs ({exc}).") from None
    policy = memory.get("maxmemory_policy")
    if policy != "noeviction":
        raise ConfigError(f"the server at {where} has maxmemory-policy {policy}, which lets it evict data the BFS "
                          f"does not hold yet; mpiburst needs 'maxmemory-policy noeviction'.")
    return int(memory.get("maxmemory") or 0) or int(memory.get("total_system_memory") or 0)


def _lacks(conf: RunConf, exc: redis.RedisError) -> ConfigError:
    """Return the error for a site server's user that lacks a right mpiburst needs (``exc``: the server's refusal)."""
    return ConfigError(f"user {conf.user} of the server at {_where(conf)} lacks a right mpiburst needs ({exc}); grant "
                       f"it the ACL rules '{USER_RULES}'.")


def unreachable(conf: RunConf, exc: ServerError) -> ServerError:
    """Return the error for a site's server that could not be reached (``exc``): its address, TLS, the cause."""
    cause = exc.__cause__ or exc
    how = "over TLS " if conf.site_tls else ""
    hint = (" check the URL's host and its ca=FILE (the server's certificate must be signed by it and name that host)"
            if conf.site_tls and "SSL" in type(cause).__name__ + str(cause) else " check the URL and that it runs")
    return ServerError(f"cannot reach the site's server at {_where(conf)} {how}({cause});{hint}.")
