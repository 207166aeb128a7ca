"""The store's connections for bulk paths (mpiburst.store.connections) against a real server.

Fetches go over sockets of their own, opened with the client's address and
credentials (redis-py has no public way to reach its sockets); commits borrow
a connection of redis-py's pool in a way every supported redis-py accepts.
The floors pass of .ci/run (.ci/floors) runs these with redis-py at its
declared floor.
"""

from __future__ import annotations

import ast
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mpiburst.errors import AuthenticationError
from mpiburst.overlay import Extent
from mpiburst.store import RedisStore
from mpiburst.store.connections import Sockets, borrow
from mpiburst.tier import Tier

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server_tier(tmp_path_factory: pytest.TempPathFactory, server_binary: str) -> Iterator[Tier]:
    directory = tmp_path_factory.mktemp("conns")
    (directory / "bfs").mkdir()
    tier = Tier.start(id=f"c{os.getpid()}", dir=str(directory), bfs_root=str(directory / "bfs"),
                      capacity="64M", server=server_binary)
    try:
        yield tier
    finally:
        tier.stop()


def _open_fds() -> int:
    """The file descriptors this process has open (each socket is one)."""
    return len(os.listdir("/proc/self/fd"))


def test_fetches_reuse_one_socket_and_read_what_was_committed(server_tier: Tier):
    store = server_tier.store
    path = os.path.join(server_tier.bfs_root, "reuse")
    store.create(path, None)
    data = os.urandom(300_000)
    store.commit(path, 0, data, [(0, 0, len(data))])
    extents = list(store.all_extents(path))
    out = memoryview(bytearray(len(data)))
    assert store.fetch_into(path, extents, 0, out)
    before = _open_fds()
    for _ in range(20):
        out[:] = bytes(len(data))
        assert store.fetch_into(path, extents, 0, out)
        assert out == data
    assert _open_fds() == before


def test_a_socket_whose_exchange_failed_is_closed_and_the_next_is_fresh(server_tier: Tier):
    sockets = Sockets(server_tier.redis)
    with pytest.raises(RuntimeError), sockets.lend() as broken:
        broken.sendall(b"*1\r\n$4\r\nPING\r\n")
        raise RuntimeError("half-way")       # the PONG is never read: the stream is out of step
    assert broken.fileno() == -1
    with sockets.lend() as sock:
        assert sock is not broken
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert sock.recv(16) == b"+PONG\r\n"
    sockets.close()
    assert sock.fileno() == -1


def test_a_wrong_password_is_refused_on_the_fetch_path(server_tier: Tier):
    conf = server_tier.conf
    wrong = redis.Redis(unix_socket_path=conf.socket, username=conf.user, password="not-the-password")
    with pytest.raises(redis.AuthenticationError):
        with Sockets(wrong).lend():
            pass
    with pytest.raises(AuthenticationError, match="conf file"):
        RedisStore(wrong).fetch_into("/x", [Extent(1, 0, 1, 1, 0)], 0, memoryview(bytearray(1)))


def test_borrowing_a_pool_connection_warns_not_on_this_redis_py(server_tier: Tier):
    pool = server_tier.redis.connection_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # 5.3 and later deprecate the command name; 5.0 to 5.2 need it
        conn = borrow(pool)
    try:
        conn.send_command("PING")
        assert conn.read_response() == b"PONG"
    finally:
        pool.release(conn)


def test_no_module_reads_a_private_attribute_of_redis_py():
    """The package reaches redis-py's objects only through their public names (issue #27).

    Every ``x._name`` in mpiburst/ (``x`` not ``self`` or ``cls``) whose name is
    a private attribute of redis-py's client, pool or connections fails here.
    """
    objects = [redis.Redis(), redis.ConnectionPool(), redis.Connection(), redis.UnixDomainSocketConnection()]
    private = {n for o in objects for n in [*dir(type(o)), *vars(o)] if n.startswith("_") and not n.startswith("__")}
    root = Path(__file__).resolve().parent.parent / "mpiburst"
    found = [f"{p.relative_to(root)}:{node.lineno}: .{node.attr}" for p in root.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.Attribute)
             and node.attr in private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    assert not found, found
