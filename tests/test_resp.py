"""The RESP bulk reader and the tier's fetch planner.

``read_bulks_into`` is tested over a real socket pair with hand-written
server bytes (every odd reply a real server can send: short, error, nil,
split anywhere); ``RedisStore.fetch_into`` against a real server, compared with a
byte model, for the three ways it reads (large pieces in place, small pieces
gathered per blob, overlapping pieces one by one in sequence order).
"""

from __future__ import annotations

import random
import socket
import threading

import pytest
import redis
from conftest import bfs_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpiburst.overlay import Extent, gaps, overlapping
from mpiburst.store import file_id
from mpiburst.store.connections import borrow
from mpiburst.store.redis_store import coalesce
from mpiburst.store.resp import read_bulks_into, resp_frames
from mpiburst.store.schema import Keys
from mpiburst.testing import Model, put


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _serve(stream: bytes, chunk: int | None = None, close: bool = False):
    """Return a socket whose peer sends ``stream`` (in ``chunk``-byte pieces, from a thread)."""
    a, b = socket.socketpair()

    def send() -> None:
        step = chunk or len(stream) or 1
        for i in range(0, len(stream), step):
            b.sendall(stream[i:i + step])
        if close:
            b.close()

    threading.Thread(target=send, daemon=True).start()
    a.settimeout(10)
    return a, b


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_replies_land_in_their_views_however_the_stream_is_split(chunk):
    rnd = random.Random(chunk)
    payloads = [rnd.randbytes(n) for n in (0, 1, 100, 70_000, 5, 300_000, 64 << 10)]
    sock, _peer = _serve(b"".join(_bulk(p) for p in payloads), chunk)
    views = [memoryview(bytearray(len(p))) for p in payloads]
    assert read_bulks_into(sock, views) == [len(p) for p in payloads]
    assert [bytes(v) for v in views] == payloads


@pytest.mark.timeout(30)
def test_a_short_reply_is_skipped_and_the_stream_stays_in_step():
    """A vanished key reads as an empty string: its view is untouched, the next reply still lands."""
    stream = _bulk(b"a" * 10) + _bulk(b"") + _bulk(b"xy") + b"$-1\r\n" + _bulk(b"z" * 200_000)
    sock, _peer = _serve(stream, 3)
    views = [memoryview(bytearray(10)), memoryview(bytearray(b"\xff" * 100_000)), memoryview(bytearray(5)),
             memoryview(bytearray(4)), memoryview(bytearray(200_000))]
    assert read_bulks_into(sock, views) == [10, 0, 2, -1, 200_000]
    assert bytes(views[1]) == b"\xff" * 100_000 and bytes(views[2]) == bytes(5)
    assert bytes(views[4]) == b"z" * 200_000


@pytest.mark.timeout(30)
def test_an_error_reply_raises_after_every_reply_is_read():
    sock, peer = _serve(_bulk(b"ok") + b"-WRONGTYPE Operation against a key\r\n" + _bulk(b"late"))
    views = [memoryview(bytearray(2)), memoryview(bytearray(4)), memoryview(bytearray(4))]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        read_bulks_into(sock, views)
    assert bytes(views[2]) == b"late"       # consumed: the connection is still usable
    peer.sendall(_bulk(b"next"))
    assert read_bulks_into(sock, [memoryview(bytearray(4))]) == [4]


@pytest.mark.timeout(30)
def test_a_closed_connection_is_a_connection_error():
    sock, _peer = _serve(b"$100\r\n" + b"x" * 50, close=True)
    with pytest.raises(redis.ConnectionError, match="closed"):
        read_bulks_into(sock, [memoryview(bytearray(100))])


@pytest.mark.timeout(30)
def test_frames_are_what_redis_py_would_send(atier):
    """Hand-built frames (large payloads passed through) are accepted by a real server."""
    conn = borrow(atier.redis.connection_pool)   # redis-py 5.0 to 5.2 need a command name, later ones none
    try:
        big = random.Random(1).randbytes(100_000)
        conn.send_packed_command(resp_frames([("SET", "resp-test", memoryview(big)), ("GET", "resp-test")]))
        assert conn.read_response() == b"OK" and conn.read_response() == big
    finally:
        atier.redis.connection_pool.release(conn)


def test_frames_are_the_same_bytes_whichever_encoder_packs_a_command():
    """Commands of names and numbers go through hiredis, the others through Python: one RESP stream either way."""
    import numpy as np

    def plain(command: tuple) -> bytes:
        out = [b"*%d\r\n" % len(command)]
        for arg in command:
            data = bytes(arg) if isinstance(arg, (bytes, bytearray, memoryview)) else str(arg).encode()
            out += [b"$%d\r\n" % len(data), data, b"\r\n"]
        return b"".join(out)

    commands = [("EVALSHA", "ab" * 20, 2, "k{é}", "k2", -1, 0, 2 ** 63, 0.25, 1e20, ""),
                ("SET", "t", memoryview(bytearray(b"xy" * 40_000))), ("SET", "s", bytearray(b"z")),
                ("X", np.int64(5), True), ("GET", "t")]
    assert b"".join(resp_frames(commands)) == b"".join(plain(c) for c in commands)


# ----------------------------------------------------------------------------- the fetch planner

def test_coalesce_gathers_small_neighbours_and_leaves_large_pieces_alone():
    small = [Extent(i, 10_000 * i, 4096, 7, 4096 * i) for i in range(5)]          # adjacent in blob 7
    far = Extent(9, 90_000, 4096, 7, 4096 * 5 + (1 << 20))                         # far away in blob 7
    other = Extent(10, 99_000, 100, 8, 0)                                           # another blob
    large = Extent(11, 200_000, 300_000, 7, 50_000)
    reads = coalesce(small + [far, other, large])
    spans = sorted((span.blob, span.boff, span.length, len(group)) for span, group in reads)
    assert spans == [(7, 0, 5 * 4096, 5), (7, 50_000, 300_000, 1), (7, far.boff, 4096, 1), (8, 0, 100, 1)]
    single = [span for span, group in reads if len(group) == 1]
    assert far in single and large in single and other in single    # received in place, at their offsets


def testoverlapping():
    assert not overlapping([Extent(1, 0, 10, 0, 0), Extent(2, 10, 5, 0, 10)])
    assert overlapping([Extent(2, 10, 5, 0, 10), Extent(1, 0, 11, 0, 0)])


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 300_000), st.integers(1, 90_000), st.booleans()),
                       min_size=1, max_size=25),
       window=st.tuples(st.integers(0, 400_000), st.integers(1, 400_000)))
def test_fetch_into_matches_a_byte_model(atier, writes, window):
    """Random batches (small and large pieces, overlaps) read through any window equal the model."""
    store = atier.store
    path = bfs_file(atier, f"fetch-{random.getrandbits(40)}.dat")
    store.create(path, None)
    model = Model()
    rnd = random.Random(len(writes))
    batch: list[tuple[int, bytes]] = []
    for off, n, new_batch in writes:
        if new_batch and batch:
            put(store, path, model, batch)
            batch = []
        batch.append((off, rnd.randbytes(n)))
    put(store, path, model, batch)
    lo, n = window
    hi = lo + n
    extents = store.extents(path, lo, hi)
    out = memoryview(bytearray(b"\xee" * n))
    assert store.fetch_into(path, extents, lo, out)
    expect = bytearray(model.data[lo:hi].ljust(n, b"\0"))
    for a, b in gaps(lo, hi, extents):       # bytes no extent covers are left as they were
        expect[a - lo:b - lo] = b"\xee" * (b - a)
    assert bytes(out) == bytes(expect)
    store.drop(path)


@pytest.mark.timeout(30)
def test_fetch_into_reports_a_vanished_blob(atier):
    store = atier.store
    path = bfs_file(atier, "vanish.dat")
    store.create(path, None)
    put(store, path, None, [(0, b"a" * 1000), (5000, b"b" * 100_000)])
    extents = store.extents(path, 0, 200_000)
    atier.redis.unlink(*{Keys().file(file_id(path), f"b:{e.blob}") for e in extents})   # what a purge does
    assert store.fetch_into(path, extents, 0, memoryview(bytearray(200_000))) is False
    assert store.fetch_into(path, extents, 0, memoryview(bytearray(200_000))) is False   # connection still fine


@given(spans=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 60)), max_size=12),
       window=st.tuples(st.integers(0, 220), st.integers(0, 80)))
def test_gaps_are_exactly_the_uncovered_bytes(spans, window):
    lo, hi = window[0], window[0] + window[1]
    extents = [Extent(i, a, n, 0, 0) for i, (a, n) in enumerate(spans)]
    covered = {x for a, n in spans for x in range(a, a + n)}
    holes = gaps(lo, hi, extents)
    assert [x for a, b in holes for x in range(a, b)] == [x for x in range(lo, hi) if x not in covered]
    assert all(a < b for a, b in holes) and all(b1 < a2 for (_, b1), (a2, _) in zip(holes, holes[1:]))
