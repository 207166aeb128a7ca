"""Authenticated connections to a run's server (the unix socket when it is here, else TCP), and its store over them."""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import AuthenticationError, ServerError
from ..runconf import AdminCredentials, RunConf
from ..store import ClusterStore, RedisStore, Store
from .tls import TlsFiles, client_options, site_client_options

#: Seconds one read from a server may block before the server counts as lost (a stopped or cut-off
#: server): a connect inside a collective then fails on every rank instead of hanging (docs/reliability.md).
#: Set here, not left to redis-py, whose default changed across the versions setup.py admits (none in 5.0,
#: 5 s in 8.x).
REPLY_TIMEOUT = 5.0
#: The same for a run with replicas: longer, since the promoted replica then serves (docs/reliability.md).
REPLICATED_REPLY_TIMEOUT = 30.0


def connect_redis(conf: RunConf, admin: bool | AdminCredentials = False, check: bool = True,
                  socket_timeout: float = REPLY_TIMEOUT) -> redis.Redis:
    """Return an authenticated redis-py client for the run (bytes replies).

    ``admin`` (True: read from the run's admin file) connects as the admin
    user; only lifecycle commands do.

    The unix socket is used when it exists on this host (fast, private);
    otherwise TCP to ``conf.host:conf.port``: mutual TLS with the run's
    certificate when ``conf.tls`` (a multi-node run, see :mod:`.tls`), TLS
    checked against the site's CA when ``conf.site_tls`` (``rediss://``).

    ``socket_timeout``: seconds one read from the server may block (:data:`REPLY_TIMEOUT`).

    With ``check`` False nothing is sent yet: the client connects on first
    use (a multi-node run's other nodes, which a process may never need, and
    whose loss is reported when their data is touched).

    Raises
    ------
    AuthenticationError
        If the server refuses the conf's credentials.
    ServerError
        If the server cannot be reached.
    """
    if admin is True:
        admin = AdminCredentials.load(conf)
    user, password = (admin.user, admin.password) if admin else (conf.user, conf.password)
    # No automatic re-send: a lost connection is reported, never silently retried (a retried
    # INCRBY or SHUTDOWN would run twice or hang on reconnect back-off).
    options: dict[str, Any] = dict(username=user, password=password, socket_connect_timeout=10,
                                   socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))
    targets: list[dict[str, Any]] = []
    if conf.socket and os.path.exists(conf.socket):
        targets.append(dict(unix_socket_path=conf.socket))
    if conf.port:
        tls = client_options(TlsFiles.of(conf.dir, conf.id)) if conf.tls else {}
        if conf.site_tls:
            tls = site_client_options(conf.site_tls)
        targets.append(dict(host=conf.host, port=conf.port, **tls))
    if not check and targets:
        return redis.Redis(**targets[0], **options)
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
    where = f"{conf.host}:{conf.port}" if conf.port else f"its socket {conf.socket}"
    raise ServerError(
        f"cannot reach the server of run {conf.id} at {where} ({last or 'no socket here and no TCP port'}); "
        f"check that it runs with 'mpiburst status --id {conf.id}'."
    ) from last   # the redis-py error stays the cause (MPIBURST_DEBUG=1 prints it)


def connect_store(conf: RunConf, node: int | None = None,
                  check: Collection[int] | None = None) -> tuple[Store, list[redis.Redis]]:
    """Return the store of a run and its clients (one per node, in node order; one for a single server).

    A multi-node run's store is a :class:`~mpiburst.store.ClusterStore`
    over one client per node; ``node`` is this process's node (its writes
    go there), None for a process on no node (the CLI, the engine, a
    stopping run). The servers of the nodes in ``check`` (default: this
    process's and node 0's) are asked now; the others on first use.

    Raises
    ------
    AuthenticationError, ServerError
        If a server checked now refuses the password or cannot be reached.
    """
    if not conf.nodes:
        client = connect_redis(conf)
        return RedisStore(client), [client]
    asked = {node or 0, 0} if check is None else set(check)
    clients: list[redis.Redis] = []
    try:
        lost = []
        wait = REPLICATED_REPLY_TIMEOUT if conf.replicas else REPLY_TIMEOUT
        for k in range(len(conf.nodes)):
            try:
                clients.append(connect_redis(conf.node(k), check=k in asked, socket_timeout=wait))
            except ServerError as exc:
                if isinstance(exc, AuthenticationError) or conf.replica(k) is None:
                    raise
                clients.append(connect_redis(conf.node(k), check=False, socket_timeout=wait))
                lost.append(k)   # its replica may serve it: asked below
        replicas = [connect_redis(view, check=False, socket_timeout=wait) if view else None
                    for view in map(conf.replica, range(len(conf.nodes)))]   # used when their node is lost
        spare = [r for r in replicas if r is not None]
        try:
            store = ClusterStore(clients, node, ranks=[n["ranks"] for n in conf.nodes],
                                 slots=[n["slots"] for n in conf.nodes], replicas=replicas)
        except BaseException:
            for client in spare:
                client.close()
            raise
        for k in lost:
            if not store.promote(k):
                store.close()
                raise ServerError(f"cannot reach the server of node {k} of run {conf.id}, nor a promoted replica of "
                                  f"it; check the run with 'mpiburst status --id {conf.id}'.")
    except BaseException:
        for client in clients:
            client.close()
        raise
    return store, store.clients   # the store's own list: a node's promoted replica replaces its client
