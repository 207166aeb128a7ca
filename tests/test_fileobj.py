"""mpiburst.open(): the Python file object over the tier.

Tests named ``test_unit_*`` use the memory tier (fast, no server);
the others run against a real server (the ``tier`` fixture).
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpiburst
from mpiburst import fileobj
from mpiburst.errors import PathError
from mpiburst.tier import Tier


# ----------------------------------------------------------------------------- unit (memory tier)

def test_unit_modes_and_errors(mem_tier):
    with pytest.raises(FileNotFoundError, match="burst://missing"):
        mpiburst.open("burst://missing", "rb", tier=mem_tier)
    with pytest.raises(FileNotFoundError):
        mpiburst.open("burst://missing", "r+b", tier=mem_tier)
    for bad in ("r", "w", "rt", "rbb", "q", "rwb"):
        with pytest.raises(ValueError, match="binary mode"):
            mpiburst.open("burst://x", bad, tier=mem_tier)
    with pytest.raises(PathError, match="outside the run's BFS root"):
        mpiburst.open("burst://../escape", "wb", tier=mem_tier)

    with mpiburst.open("burst://f", "xb", tier=mem_tier) as f:
        assert (f.readable(), f.writable(), f.seekable()) == (False, True, True)
        assert f.write(b"abcdef") == 6
        with pytest.raises(io.UnsupportedOperation):
            f.read()
    with pytest.raises(FileExistsError):
        mpiburst.open("burst://f", "xb", tier=mem_tier)
    with mpiburst.open("burst://f", "ab", tier=mem_tier) as f:
        f.seek(0)
        f.write(b"gh")  # append mode: at the end whatever the position
        assert f.tell() == 8
    with mpiburst.open("burst://f", "rb", tier=mem_tier) as f:
        assert f.name == "burst://f" and f.path == os.path.join(mem_tier.bfs_root, "f")
        assert f.read() == b"abcdefgh"
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            f.truncate(0)
    with mpiburst.open("burst://f", "r+b", tier=mem_tier) as f:
        f.seek(-3, io.SEEK_END)
        f.write(b"XY")
        f.seek(1)
        assert f.read(4) == b"bcde"
        assert f.read() == b"XYh"
    with mpiburst.open("burst://f", "wb", tier=mem_tier) as f:  # truncates
        assert f.seek(0, io.SEEK_END) == 0
    f = mpiburst.open("burst://f", "rb", tier=mem_tier)
    f.close()
    f.close()
    with pytest.raises(ValueError, match="closed file"):
        f.read()


def test_unit_own_writes_invalidate_the_read_cache(mem_tier, monkeypatch):
    monkeypatch.setattr(fileobj, "PAGE", 16)
    with mpiburst.open("burst://c", "w+b", tier=mem_tier) as f:
        f.write(bytes(range(100)))
        f.seek(0)
        assert f.read(40) == bytes(range(40))  # pages 0..2 now cached
        f.seek(20)
        f.write(b"\xff" * 5)
        f.seek(0)
        assert f.read(40) == bytes(range(20)) + b"\xff" * 5 + bytes(range(25, 40))
        f.truncate(30)
        f.seek(0, io.SEEK_END)
        f.write(b"Z")
        f.seek(28)
        assert f.read() == bytes([28, 29]) + b"Z"


def test_unit_close_to_open(mem_tier):
    w = mpiburst.open("burst://cto", "wb", tier=mem_tier, buffer="1M")
    w.write(b"first")
    r = mpiburst.open("burst://cto", "rb", tier=mem_tier)
    assert r.read() == b""  # the writer's buffer was not pushed before this open
    w.flush()
    r2 = mpiburst.open("burst://cto", "rb", tier=mem_tier)
    assert r2.read() == b"first"
    w.close(), r.close(), r2.close()


def test_unit_numpy_and_zipfile(mem_tier):
    data = np.random.default_rng(1).random((50, 7))
    with mpiburst.open("burst://a.npy", "wb", tier=mem_tier) as f:
        np.save(f, data)
    with mpiburst.open("burst://a.npy", "rb", tier=mem_tier) as f:
        np.testing.assert_array_equal(np.load(f), data)

    with mpiburst.open("burst://z.zip", "w+b", tier=mem_tier) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a.txt", "hello " * 10000)
            z.writestr("b.bin", bytes(range(256)) * 100)
    with mpiburst.open("burst://z.zip", "rb", tier=mem_tier) as f:
        with zipfile.ZipFile(f) as z:
            assert z.testzip() is None
            assert z.read("a.txt") == b"hello " * 10000
            assert z.read("b.bin") == bytes(range(256)) * 100

    with mpiburst.open("burst://lines", "wb", tier=mem_tier) as f:
        f.write(b"one\ntwo\nthree")
    with mpiburst.open("burst://lines", "rb", tier=mem_tier) as f:
        assert f.readline() == b"one\n"
        assert list(f) == [b"two\n", b"three"]
    with io.TextIOWrapper(mpiburst.open("burst://lines", "rb", tier=mem_tier), encoding="ascii") as t:
        assert t.read().split() == ["one", "two", "three"]


_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.binary(min_size=0, max_size=300)),
    st.tuples(st.just("seek"), st.integers(0, 700), st.sampled_from([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])),
    st.tuples(st.just("read"), st.integers(-1, 400)),
    st.tuples(st.just("readinto"), st.integers(0, 400)),
    st.tuples(st.just("truncate"), st.integers(0, 600)),
    st.tuples(st.just("flush")),
), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, buffer=st.sampled_from([1, 64, 4096]))
def test_unit_random_ops_match_bytesio(ops, buffer, monkeypatch):
    monkeypatch.setattr(fileobj, "PAGE", 32)  # small pages: reads cross page edges
    with tempfile.TemporaryDirectory() as root:
        tier = Tier.memory(root)
        ref = io.BytesIO()
        with mpiburst.open(os.path.join(root, "r.bin"), "w+b", tier=tier, buffer=buffer) as f:
            for op, *args in ops:
                if op == "seek":
                    offset, whence = args
                    offset = offset - (350 if whence != io.SEEK_SET else 0)
                    if ref.seek(0, whence) + offset < 0:  # BytesIO would raise too: skip
                        ref.seek(f.tell())
                        continue
                    ref.seek(f.tell())
                    assert f.seek(offset, whence) == ref.seek(offset, whence)
                elif op == "readinto":
                    a, b = bytearray(args[0]), bytearray(args[0])
                    assert f.readinto(a) == ref.readinto(b)
                    assert a == b
                elif op == "flush":
                    f.flush()
                elif op == "truncate":  # like a real file (os.ftruncate), and unlike BytesIO, it may extend
                    assert f.truncate(args[0]) == args[0]
                    ref.truncate(args[0])
                    pos, end = ref.tell(), ref.seek(0, io.SEEK_END)
                    ref.write(bytes(max(0, args[0] - end)))
                    ref.seek(pos)
                else:
                    assert getattr(f, op)(*args) == getattr(ref, op)(*args)
                assert f.tell() == ref.tell()
        with mpiburst.open(os.path.join(root, "r.bin"), "rb", tier=tier) as f:
            assert f.read() == ref.getvalue()


# ----------------------------------------------------------------------------- real server

@pytest.mark.timeout(60)
def test_file_object_through_a_real_server_then_sync(tier):
    payload = os.urandom(3 << 20)  # larger than the write buffer and many cache pages
    with mpiburst.open("burst://big.bin", "wb", tier=tier, buffer="1M") as f:
        f.write(payload[:1000])
        f.write(memoryview(payload)[1000:])
    assert not os.path.exists(os.path.join(tier.bfs_root, "big.bin"))  # only in the tier so far
    with mpiburst.open("burst://big.bin", "rb", tier=tier) as f:
        assert f.read(10) == payload[:10]
        f.seek(2 << 20)
        assert f.read(5000) == payload[2 << 20:(2 << 20) + 5000]
        f.seek(0)
        assert f.read() == payload
    report = mpiburst.sync("burst://big.bin", tier=tier)
    assert report.size == len(payload)
    with open(os.path.join(tier.bfs_root, "big.bin"), "rb") as plain:
        assert plain.read() == payload
    with mpiburst.open("burst://big.bin", "r+b", tier=tier) as f:  # newest bytes: tier over BFS
        f.seek(100)
        f.write(b"new")
    with mpiburst.open("burst://big.bin", "rb", tier=tier) as f:
        f.seek(98)
        assert f.read(7) == payload[98:100] + b"new" + payload[103:105]


@pytest.mark.timeout(120)
def test_many_opens_in_one_process_leak_no_connection(tier):
    """60 opens and closes in one process: each close gives its connection back (no MaxConnectionsError)."""
    before = None
    for i in range(60):
        if i == 10:  # the pool holds its few idle connections by now; 50 more opens add none (a leak: 50)
            before = _rank_connections(tier)
        with mpiburst.open("burst://loop.bin", "r+b" if i else "wb", tier=tier) as f:
            f.seek(4 * i)
            f.write(i.to_bytes(4, "little"))
    assert _rank_connections(tier) <= before + 1  # +1: the engine beside the server may open one more
    with mpiburst.open("burst://loop.bin", "rb", tier=tier) as f:
        data = f.read()
    assert [int.from_bytes(data[4 * i:4 * i + 4], "little") for i in range(60)] == list(range(60))


def _rank_connections(tier) -> int:
    """Connections the server has open for the run's ordinary user (ranks, file objects, the engine)."""
    return sum(1 for c in tier.admin().client_list() if c.get("user") == tier.conf.user)
