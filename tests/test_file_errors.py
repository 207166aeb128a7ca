"""Errors of the MPI-IO driver: each raises what ``mpi4py.MPI.File`` would, or a clear mpiburst error.

The driver's own checks (amode, existence, buffer specs, paths) are unit
tests on the memory store (``mem_tier``): the driver decides them, not the
server. What a server limits (a full tier, a write above the bulk limit)
runs on real servers started here with a tiny or a large ``capacity``.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
import redis
from mpi4py import MPI

import mpiburst
from conftest import bfs_file
from mpiburst import File
from mpiburst.errors import PathError, TierFullError
from mpiburst.tier import Tier

RW = MPI.MODE_CREATE | MPI.MODE_RDWR


def error_class(excinfo) -> int:
    return excinfo.value.Get_error_class()


# --------------------------------------------------------------------------- amode and existence

@pytest.mark.timeout(60)
def test_excl_on_existing_tier_file(mem_tier):
    File.Open(MPI.COMM_SELF, "burst://x.dat", RW).Close()
    with pytest.raises(MPI.Exception) as exc:
        File.Open(MPI.COMM_SELF, "burst://x.dat", RW | MPI.MODE_EXCL)
    assert error_class(exc) == MPI.ERR_FILE_EXISTS


@pytest.mark.timeout(60)
def test_excl_on_existing_bfs_file(mem_tier):
    open(bfs_file(mem_tier, "onbfs.dat"), "wb").close()
    with pytest.raises(MPI.Exception) as exc:
        File.Open(MPI.COMM_SELF, "burst://onbfs.dat", RW | MPI.MODE_EXCL)
    assert error_class(exc) == MPI.ERR_FILE_EXISTS


@pytest.mark.timeout(60)
def test_excl_matches_mpi_file(mem_tier, tmp_path):
    real = str(tmp_path / "real.dat")
    open(real, "wb").close()
    with pytest.raises(MPI.Exception) as mpi_exc:
        MPI.File.Open(MPI.COMM_SELF, real, RW | MPI.MODE_EXCL)
    File.Open(MPI.COMM_SELF, "burst://excl.dat", RW).Close()
    with pytest.raises(MPI.Exception) as our_exc:
        File.Open(MPI.COMM_SELF, "burst://excl.dat", RW | MPI.MODE_EXCL)
    assert error_class(our_exc) == error_class(mpi_exc)


@pytest.mark.timeout(60)
def test_missing_file(mem_tier, tmp_path):
    with pytest.raises(MPI.Exception) as mpi_exc:
        MPI.File.Open(MPI.COMM_SELF, str(tmp_path / "nope.dat"), MPI.MODE_RDONLY)
    with pytest.raises(MPI.Exception) as exc:
        File.Open(MPI.COMM_SELF, "burst://nope.dat", MPI.MODE_RDONLY)
    assert error_class(exc) == MPI.ERR_NO_SUCH_FILE == error_class(mpi_exc)
    with pytest.raises(MPI.Exception) as exc:
        File.Open(MPI.COMM_SELF, "burst://nope.dat", MPI.MODE_RDWR)
    assert error_class(exc) == MPI.ERR_NO_SUCH_FILE


@pytest.mark.timeout(60)
def test_write_to_read_only_file(mem_tier, tmp_path):
    real = str(tmp_path / "ro.dat")
    open(real, "wb").close()
    g = MPI.File.Open(MPI.COMM_SELF, real, MPI.MODE_RDONLY)
    with pytest.raises(MPI.Exception) as mpi_exc:
        g.Write_at(0, b"x")
    g.Close()
    File.Open(MPI.COMM_SELF, "burst://ro.dat", RW).Close()
    with File.Open(MPI.COMM_SELF, "burst://ro.dat", MPI.MODE_RDONLY) as f:
        for call in (lambda: f.Write_at(0, b"x"), lambda: f.Write(b"x"), lambda: f.Iwrite_at(0, b"x"),
                     lambda: f.Write_at_all(0, b"x")):
            with pytest.raises(MPI.Exception) as exc:
                call()
            assert error_class(exc) == MPI.ERR_READ_ONLY == error_class(mpi_exc)
        assert f.Get_size() == 0


@pytest.mark.timeout(60)
def test_read_from_write_only_file(mem_tier, tmp_path):
    real = str(tmp_path / "wo.dat")
    g = MPI.File.Open(MPI.COMM_SELF, real, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    with pytest.raises(MPI.Exception) as mpi_exc:
        g.Read_at(0, bytearray(1))
    g.Close()
    with File.Open(MPI.COMM_SELF, "burst://wo.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE) as f:
        f.Write_at(0, b"abc")
        with pytest.raises(MPI.Exception) as exc:
            f.Read_at(0, bytearray(3))
        assert error_class(exc) == MPI.ERR_ACCESS == error_class(mpi_exc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("amode", [MPI.MODE_RDONLY | MPI.MODE_CREATE, MPI.MODE_RDONLY | MPI.MODE_EXCL,
                                   MPI.MODE_RDWR | MPI.MODE_WRONLY, 0])
def test_bad_amode(mem_tier, tmp_path, amode):
    with pytest.raises(MPI.Exception) as mpi_exc:
        MPI.File.Open(MPI.COMM_SELF, str(tmp_path / "am.dat"), amode)
    with pytest.raises(MPI.Exception) as exc:
        File.Open(MPI.COMM_SELF, "burst://am.dat", amode)
    assert error_class(exc) == MPI.ERR_AMODE == error_class(mpi_exc)
    assert not os.path.exists(bfs_file(mem_tier, "am.dat"))


# --------------------------------------------------------------------------- buffer specs, side by side

BAD_WRITE_SPECS = {
    "int": 5,
    "str": "abc",
    "one-item list": [b"abc"],
    "five-item list": [b"abc", 1, 0, 0, MPI.BYTE],
    "unknown typecode": [bytearray(8), "zz"],
    "non-contiguous numpy": np.arange(20, dtype=np.uint8)[::2],
    "non-contiguous 2-d numpy": np.zeros((4, 4), dtype=np.uint8)[:, :2],
    "None": None,
}


@pytest.fixture
def side_by_side(mem_tier, tmp_path):
    """An ``MPI.File`` on a real file and an ``mpiburst.File`` (memory tier), both RDWR with 100 bytes."""
    g = MPI.File.Open(MPI.COMM_SELF, str(tmp_path / "real.dat"), RW)
    f = File.Open(MPI.COMM_SELF, "burst://spec.dat", RW)
    g.Write_at(0, bytes(100))
    f.Write_at(0, bytes(100))
    yield g, f
    g.Close()
    f.Close()


def outcome(call) -> type | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the type is what we compare
        return type(exc)
    return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(BAD_WRITE_SPECS))
def test_bad_write_spec_raises_like_mpi_file(side_by_side, name):
    g, f = side_by_side
    spec = BAD_WRITE_SPECS[name]
    theirs = outcome(lambda: g.Write_at(0, spec))
    ours = outcome(lambda: f.Write_at(0, spec))
    assert theirs is not None, f"mpi4py accepted {name}"
    assert ours is theirs
    buf = bytearray(100)
    f.Read_at(0, buf)
    assert bytes(buf) == bytes(100)           # nothing was written


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", [b"abcd", np.frombuffer(b"abcd", dtype=np.uint8)], ids=["bytes", "read-only numpy"])
def test_read_into_read_only_buffer_raises_like_mpi_file(side_by_side, target):
    g, f = side_by_side
    theirs = outcome(lambda: g.Read_at(0, target))
    ours = outcome(lambda: f.Read_at(0, target))
    assert theirs is BufferError and ours is theirs


@pytest.mark.timeout(60)
def test_fortran_ordered_array_is_written_in_memory_order_like_mpi_file(side_by_side, tmp_path):
    """mpi4py writes an F-contiguous array's memory as is; the driver must too (not raise)."""
    g, f = side_by_side
    arr = np.asfortranarray(np.arange(16, dtype=np.uint8).reshape(4, 4))
    g.Write_at(0, arr)
    f.Write_at(0, arr)
    mine, theirs = bytearray(16), bytearray(16)
    g.Read_at(0, theirs)
    f.Read_at(0, mine)
    assert mine == theirs


# --------------------------------------------------------------------------- paths

@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["burst://../escape.dat", "burst:///etc/passwd", "burst://sub/../../x.dat"])
def test_burst_path_outside_root_is_refused(mem_tier, url):
    with pytest.raises(PathError) as exc:
        File.Open(MPI.COMM_SELF, url, RW)
    assert "outside" in str(exc.value)
    assert mpiburst.PathError is PathError


@pytest.mark.timeout(60)
def test_symlink_out_of_root_is_refused(mem_tier, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, bfs_file(mem_tier, "link"))
    with pytest.raises(PathError):
        File.Open(MPI.COMM_SELF, "burst://link/f.dat", RW)
    assert list(outside.iterdir()) == []


@pytest.mark.timeout(60)
def test_absolute_burst_path_inside_root_is_accepted(mem_tier):
    url = "burst://" + bfs_file(mem_tier, "abs.dat")
    assert url.startswith("burst:///")
    with File.Open(MPI.COMM_SELF, url, RW) as f:
        f.Write_at(0, b"abs")
    with File.Open(MPI.COMM_SELF, "burst://abs.dat", MPI.MODE_RDONLY) as f:
        buf = bytearray(3)
        f.Read_at(0, buf)
    assert bytes(buf) == b"abs"


@pytest.mark.timeout(60)
def test_plain_path_is_mpi_file(mem_tier, tmp_path):
    f = File.Open(MPI.COMM_SELF, str(tmp_path / "plain.dat"), RW)
    assert type(f) is MPI.File
    f.Close()
    File.Delete(str(tmp_path / "plain.dat"))
    assert not (tmp_path / "plain.dat").exists()


# --------------------------------------------------------------------------- a full tier

def _tiny_tier(tmp_path, server_binary, capacity: str) -> Tier:
    (tmp_path / "bfs").mkdir()
    return Tier.start(id=f"full{os.getpid()}", dir=str(tmp_path), bfs_root=str(tmp_path / "bfs"),
                      capacity=capacity, server=server_binary)


def _block(i: int, n: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.timeout(180)
def test_full_tier_flushes_to_make_room_and_loses_nothing(tmp_path, server_binary):
    """8 MiB tier, 48 MiB written: the driver makes room by flushing; every byte ends correct."""
    block, nblocks = 512 << 10, 96
    with _tiny_tier(tmp_path, server_binary, "8M") as t:
        info = MPI.Info.Create()
        info.Set("mpiburst_wr_buffer", "1M")
        f = File.Open(MPI.COMM_SELF, "burst://stream.dat", RW, info)
        info.Free()
        try:
            for i in range(nblocks):
                f.Write_at(i * block, _block(i, block))
            f.Sync()
        except redis.ResponseError as exc:  # a raw server error must never reach the application
            pytest.fail(f"raw server error surfaced: {exc}")
        except TierFullError:
            pytest.fail("the tier reported full although the file could be flushed to make room")
        assert f.Get_size() == nblocks * block
        buf = bytearray(block)
        for i in range(nblocks):
            f.Read_at(i * block, buf)
            assert buf == _block(i, block), f"block {i} differs after the tier filled up"
        f.Close()
        mpiburst.sync("burst://stream.dat", tier=t)
        with open(tmp_path / "bfs" / "stream.dat", "rb") as fh:
            for i in range(nblocks):
                assert fh.read(block) == _block(i, block), f"block {i} differs on the BFS"
        used = t.status()["used_memory"]
        assert used < 4 * t.capacity


@pytest.mark.timeout(180)
def test_full_tier_with_nothing_to_free_raises_tier_full_and_keeps_acknowledged_bytes(tmp_path, server_binary):
    """A pinned file cannot be flushed away: a clear TierFullError; once unpinned, no returned write is lost.

    The other file in the tier is flushed and purged to make room first; only
    when the pinned file's own bytes fill the tier does the write fail.
    """
    block = 512 << 10
    with _tiny_tier(tmp_path, server_binary, "8M") as t:
        info = MPI.Info.Create()
        info.Set("mpiburst_wr_buffer", "1M")
        with File.Open(MPI.COMM_SELF, "burst://scratch.dat", RW, info) as s:
            s.Write_at(0, bytes(3 << 20))
        f = File.Open(MPI.COMM_SELF, "burst://pinned.dat", RW, info)
        info.Free()
        mpiburst.pin("burst://pinned.dat", tier=t)
        written = 0
        with pytest.raises(TierFullError) as exc:
            for i in range(64):
                f.Write_at(i * block, _block(i, block))
                written = i + 1
            f.Sync()
        assert "full" in str(exc.value)
        assert 0 < written < 64
        assert mpiburst.frag_stat("burst://scratch.dat", tier=t).dirty == 0     # flushed to make room
        mpiburst.unpin("burst://pinned.dat", tier=t)  # the user lets the pinned file be flushed
        f.Sync()
        buf = bytearray(block)
        for i in range(written):                      # every write that returned is there
            f.Read_at(i * block, buf)
            assert buf == _block(i, block), f"acknowledged block {i} was lost"
        f.Close()


# --------------------------------------------------------------------------- a write above the bulk limit

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_write_larger_than_bulk_limit(tmp_path, server_binary):
    """One 520 MiB Write_at (the server's proto-max-bulk-len is 512 MiB) is split and reads back intact."""
    n = 520 << 20
    period = (1 << 20) + 7          # a period unrelated to blob and extent sizes: misplaced pieces show
    data = np.resize(np.random.default_rng(7).integers(0, 256, period, dtype=np.uint8), n)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "bfs").mkdir()
    with Tier.start(id=f"big{os.getpid()}", dir=str(tmp_path), bfs_root=str(tmp_path / "bfs"),
                    capacity="1200M", server=server_binary) as t:
        limit = int(t.admin().config_get("proto-max-bulk-len")["proto-max-bulk-len"])
        assert n > limit
        with File.Open(MPI.COMM_SELF, "burst://big.dat", RW) as f:
            st = MPI.Status()
            f.Write_at(0, data, st)
            assert st.Get_count(MPI.BYTE) == n
        del data
        with File.Open(MPI.COMM_SELF, "burst://big.dat", MPI.MODE_RDONLY) as f:
            assert f.Get_size() == n
            out = np.empty(n, dtype=np.uint8)
            st = MPI.Status()
            f.Read_at(0, out, st)
            assert st.Get_count(MPI.BYTE) == n
        assert hashlib.sha256(out).hexdigest() == digest
