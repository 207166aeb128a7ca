"""Authenticated connections to a run's server: the unix socket when it is here, else TCP."""

from __future__ import annotations

import os
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import AuthenticationError, ServerError
from ..runconf import RunConf


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
