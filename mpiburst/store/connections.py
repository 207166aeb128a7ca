"""Connections for the bulk paths of :mod:`mpiburst.store.resp`, through redis-py's public API only.

Commits stream their payload over a connection borrowed from the client's
pool (:func:`borrow`): redis-py's ``send_packed_command`` sends the RESP
frames as they are, and ``read_response`` parses the short replies.

Fetches receive each bulk reply straight into its destination
(:func:`~mpiburst.store.resp.read_bulks_into`), which needs the socket
itself. redis-py has no public way to reach a connection's socket, so
fetches go over sockets of their own (:class:`Sockets`), opened to the same
server with the same credentials as the client's pool, and with its TLS
settings when the pool's connections are TLS (a multi-node run's TCP).
"""

from __future__ import annotations

import inspect
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from .resp import read_simple, resp_frames

# redis-py before 5.3 requires the name of a command (unused) to hand out a connection;
# 5.3 and later deprecate any argument.
_NAMED = inspect.signature(redis.ConnectionPool.get_connection).parameters["command_name"].default \
    is inspect.Parameter.empty


def borrow(pool: redis.ConnectionPool) -> Any:
    """Return a connection of ``pool``, connected; give it back with ``pool.release``."""
    return pool.get_connection("_") if _NAMED else pool.get_connection()


class Sockets:
    """A pool of authenticated sockets to the server that a redis-py client talks to.

    The address (a unix socket ``path``, or ``host`` and ``port``) and the
    credentials are the client pool's ``connection_kwargs``, as
    :func:`mpiburst.server.connection.connect_redis` sets them. A socket is
    opened on first use and reused while its last exchange was whole; one
    whose exchange failed is closed, since its reply stream is out of step.

    Parameters
    ----------
    client
        The client whose server the sockets reach.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._kwargs = dict(client.connection_pool.connection_kwargs)
        self._tls = _tls_context(self._kwargs) if issubclass(client.connection_pool.connection_class,
                                                               redis.SSLConnection) else None
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @contextmanager
    def lend(self) -> Iterator[socket.socket]:
        """Lend a connected, authenticated socket for one exchange.

        Raises
        ------
        redis.ConnectionError
            If the server cannot be reached.
        redis.AuthenticationError
            If it refuses the credentials.
        """
        sock = self._take()
        try:
            yield sock
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._idle.append(sock)

    def close(self) -> None:
        """Close the idle sockets (one lent out is closed when it comes back broken, or reused)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _take(self) -> socket.socket:
        with self._lock:
            if self._pid != os.getpid():   # a forked child: the parent's sockets are not ours to use
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _connect(self) -> socket.socket:
        kw = self._kwargs
        where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        try:
            if kw.get("path"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(kw.get("socket_connect_timeout"))
                sock.connect(kw["path"])
            else:
                sock = socket.create_connection((kw.get("host", "localhost"), kw.get("port", 6379)),
                                                kw.get("socket_connect_timeout"))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=kw.get("host"))
        except OSError as exc:
            raise redis.ConnectionError(f"cannot connect to {where}: {exc}") from exc
        try:
            sock.settimeout(kw.get("socket_timeout"))
            password, user = kw.get("password"), kw.get("username")
            commands: list[tuple] = []
            if password is not None:
                commands.append(("AUTH", user, password) if user else ("AUTH", password))
            if kw.get("db"):
                commands.append(("SELECT", kw["db"]))
            for frame in resp_frames(commands):
                sock.sendall(frame)
            refused = [r for r in read_simple(sock, len(commands)) if isinstance(r, redis.ResponseError)]
            if refused:
                raise (redis.AuthenticationError if password is not None else redis.ResponseError)(str(refused[0]))
        except BaseException:
            sock.close()
            raise
        return sock


def _tls_context(kw: dict[str, Any]) -> ssl.SSLContext:
    """Return a TLS context with the settings of redis-py's ``ssl_*`` connection options (CA, certificate, checks)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kw.get("ssl_ca_certs"),
                                     capath=kw.get("ssl_ca_path"))
    reqs = kw.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(reqs, str):
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}[reqs]
    ctx.check_hostname = bool(kw.get("ssl_check_hostname")) and reqs != ssl.CERT_NONE
    ctx.verify_mode = reqs
    if kw.get("ssl_certfile"):
        ctx.load_cert_chain(kw["ssl_certfile"], kw.get("ssl_keyfile"), kw.get("ssl_password"))
    if kw.get("ssl_min_version") is not None:
        ctx.minimum_version = kw["ssl_min_version"]
    return ctx
