"""The store contract suite (mpiburst.testing.store) on the memory store and on a real server.

The real server is whatever ``server_binary`` gives (``$MPIBURST_SERVER``;
CI runs the suite once with Valkey 9 and once with Redis 7.0). Beside the
contract: what only a server can show (a dead server, a full server) raises
mpiburst's errors, never redis-py's.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from mpiburst.errors import MpiburstError, TierConnectionError
from mpiburst.overlay import Extent
from mpiburst.server import pid_alive
from mpiburst.store import MemoryStore, RecordGone, Store
from mpiburst.testing.store import FullStoreTests, StoreTests, wait_for
from mpiburst.tier import Tier, open_store

pytestmark = pytest.mark.timeout(120)


class TestMemoryStore(StoreTests, FullStoreTests):
    """The contract on the pure-Python store (unit tests)."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        yield MemoryStore()

    @pytest.fixture
    def small_store(self) -> Iterator[Store]:
        yield MemoryStore(capacity=8 << 20)

    @pytest.fixture
    def reopen(self, store: Store) -> Callable[[], Store]:
        return lambda: store                       # closing keeps the object's data: it is the store


def _quiet_tier(directory: Path, server_binary: str, capacity: str) -> Tier:
    """A real tier whose engine is stopped, so nothing but the test touches the store (its queue)."""
    bfs = directory / "bfs"
    bfs.mkdir(exist_ok=True)
    tier = Tier.start(id=f"s{os.getpid()}", dir=str(directory), bfs_root=str(bfs), capacity=capacity,
                      server=server_binary)
    pid = tier.conf.engine_pid
    if pid:
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not pid_alive(pid), timeout=15)
    return tier


def _wipe(tier: Tier) -> None:
    """Remove every key, as the ordinary user (SCAN and UNLINK; FLUSHALL is the admin's)."""
    keys = list(tier.redis.scan_iter(count=1000))
    if keys:
        tier.redis.unlink(*keys)


@pytest.fixture(scope="module")
def server_tier(tmp_path_factory: pytest.TempPathFactory, server_binary: str) -> Iterator[Tier]:
    """One real server for the contract tests of this module."""
    tier = _quiet_tier(tmp_path_factory.mktemp("store"), server_binary, "256M")
    try:
        yield tier
    finally:
        tier.stop()


class TestRedisStore(StoreTests, FullStoreTests):
    """The contract on a real server: one server for the class, emptied before each test."""

    @pytest.fixture
    def store(self, server_tier: Tier) -> Iterator[Store]:
        _wipe(server_tier)
        yield server_tier.store

    @pytest.fixture
    def reopen(self, server_tier: Tier) -> Callable[[], Store]:
        return lambda: open_store(server_tier.conf)[0]     # a new connection to the same server

    @pytest.fixture
    def small_store(self, tmp_path: Path, server_binary: str) -> Iterator[Store]:
        tier = _quiet_tier(tmp_path, server_binary, "8M")
        try:
            yield tier.store
        finally:
            tier.stop()


def test_a_dead_server_raises_tier_connection_errors(tmp_path, server_binary):
    """Every kind of call on a store whose server died raises TierConnectionError with what to do."""
    tier = _quiet_tier(tmp_path, server_binary, "64M")
    store = tier.store
    store.create("/bfs/a", None)
    os.kill(tier.conf.pid, signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(tier.conf.pid, tier.conf.server), timeout=15)
    calls = [lambda: store.meta("/bfs/a"), lambda: store.commit("/bfs/a", 0, b"x", [(0, 0, 1)]),
             lambda: list(store.all_extents("/bfs/a")), lambda: store.lease("/bfs/a", 1),
             lambda: store.enqueue(b"x"), lambda: store.dequeue(0.1), lambda: store.channel_open(0),
             lambda: store.fetch_into("/bfs/a", [Extent(1, 0, 1, 1, 0)], 0, memoryview(bytearray(1))),
             lambda: store.writer().send("/bfs/a", 0, b"x", [(0, 0, 1)])]
    for call in calls:
        with pytest.raises(TierConnectionError, match="mpiburst status"):
            call()
    tier.stop()


@pytest.mark.parametrize("raw, expected, words", [
    (redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "TierFullError", "--capacity"),
    (redis.ResponseError("OOM command not allowed"), "TierFullError", "--capacity"),
    (redis.TimeoutError("Timeout reading from socket"), "TierConnectionError", "mpiburst status"),
    (redis.ConnectionError("Connection refused"), "TierConnectionError", "mpiburst status"),
    (ConnectionResetError(104, "Connection reset by peer"), "TierConnectionError", "mpiburst status"),
    (redis.AuthenticationError("invalid password"), "AuthenticationError", "conf file"),
    (redis.ResponseError("WRONGTYPE Operation against a key"), "ServerError", "server log"),
])
def test_every_server_error_becomes_an_mpiburst_error(raw, expected, words):
    """What redis-py raises (a full tier, a stalled or dead server, ...) reaches nobody as such (#13 item 14)."""
    from mpiburst.store.redis_errors import as_mpiburst_error

    error = as_mpiburst_error(raw)
    assert type(error).__name__ == expected and isinstance(error, MpiburstError)
    assert words in str(error) and str(error).endswith(".")


def test_the_contract_suite_calls_every_method_of_the_interface():
    """A method added to Store (or its lease and writer) without a contract test fails here."""
    import inspect

    import mpiburst.testing
    import mpiburst.testing.store
    from mpiburst.store import BatchWriter, FlushLease

    source = inspect.getsource(mpiburst.testing.store) + inspect.getsource(mpiburst.testing)
    methods = {f"{cls.__name__}.{name}" for cls in (Store, FlushLease, BatchWriter)
               for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}
    uncalled = sorted(m for m in methods if f".{m.split('.')[1]}(" not in source)
    assert not uncalled, f"methods the contract suite (mpiburst.testing.store) never calls: {uncalled}"


def test_counters_sent_behind_a_batch_to_a_server_that_lost_its_scripts_are_added_again(server_tier):
    """A restarted server (its script cache empty) refuses both; the batch is retried, the counters added alone."""
    _wipe(server_tier)
    store = server_tier.store
    store.create("/bfs/r", None)
    w = store.writer()
    try:
        w.send("/bfs/r", 0, b"ab", [(0, 0, 2)])
        assert w.finish() == 1                     # the scripts are loaded now
        server_tier.redis.script_flush()
        w.send("/bfs/r", 0, b"cd", [(2, 0, 2)])
        w.stats_add("/bfs/r", "p", {"writes": 1})
        with pytest.raises(RecordGone):            # the writer's caller commits it again (TierFile._commit)
            w.finish()
    finally:
        w.close()
    assert store.stats()[0] == {"/bfs/r": {"p": {"writes": 1}}}


def test_a_create_on_a_server_that_lost_its_scripts_loads_them_and_makes_the_record(server_tier):
    """The create's own EVALSHA (not redis-py's script object) falls back to it on NOSCRIPT, once."""
    _wipe(server_tier)
    store = server_tier.store
    server_tier.redis.script_flush()
    meta = store.create("/bfs/n", None, umask=0o22, writing=True)
    assert (meta.path, meta.size, meta.writers, meta.umask) == ("/bfs/n", 0, 1, 0o22)
    assert store.create("/bfs/n", None, writing=True).writers == 2   # loaded now: the fast path keeps the record
    assert list(store.files()) == ["/bfs/n"]


def test_a_closing_batch_and_the_counters_behind_it_leave_in_one_send(server_tier, monkeypatch):
    """A handle's last batch waits for its counters: both go out in one send; without counters, finish sends it."""
    _wipe(server_tier)
    store = server_tier.store
    store.create("/bfs/a", None, writing=True)
    store.create("/bfs/b", None, writing=True)
    w = store.writer()
    store._ensure_loaded()                          # the scripts' loads are not the batches' sends
    sends: list[int] = []
    send = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda self, frames, **kw: (sends.append(len(frames)), send(self, frames, **kw))[1])
    try:
        w.send("/bfs/a", 0, b"ab", [(0, 0, 2)], closing=True)
        assert sends == []                          # held for the counters
        w.stats_add("/bfs/a", "p", {"writes": 1})
        assert len(sends) == 1
        assert w.finish() == 1
        w.send("/bfs/b", 0, b"cd", [(0, 0, 2)], closing=True)
        assert w.finish() == 1 and len(sends) == 2  # no counters came: finish sent it
    finally:
        w.close()
    for path, data in (("/bfs/a", b"ab"), ("/bfs/b", b"cd")):
        meta = store.meta(path)
        assert meta is not None and meta.writers == 0 and meta.size == 2
        out = bytearray(2)
        meta, extents = store.window(path, 0, 2)
        assert store.fetch_into(path, extents, 0, memoryview(out)) and bytes(out) == data
    assert store.stats()[0] == {"/bfs/a": {"p": {"writes": 1}}}


def test_a_drop_scans_no_keyspace(server_tier):
    """Dropping a file finds its keys from its record's parts: its cost does not grow with the tier's files."""
    _wipe(server_tier)
    store = server_tier.store
    for i in range(50):
        store.create(f"/bfs/f{i}", None)
        store.commit(f"/bfs/f{i}", 0, b"x" * 10, [(0, 0, 10)])

    def scans() -> int:
        return int(server_tier.redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    before = scans()
    store.drop("/bfs/f7")
    assert scans() == before and store.meta("/bfs/f7") is None and len(store.files()) == 49
    assert server_tier.redis.dbsize() == 49 * 4 + 1   # each file's record, index, batches, blob; the registry
