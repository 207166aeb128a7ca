"""Single-process unit tests of the MPI-IO driver ``mpiburst.File`` on the memory store.

One process is ``mpiexec -n 1``: the communicator is ``COMM_SELF`` (size 1).
Every test runs on the ``mem_tier`` fixture (the in-process memory store,
BFS root ``tmp/bfs``) and checks bytes read back through the driver, the
BFS file, or the tier's own records. The driver reaches the tier only
through the ``Store`` interface, whose contract ``tests/test_store.py`` runs
on the memory store and on a real server alike; the driver against a real
server is checked by ``tests/test_file_mpi.py`` (real ranks),
``tests/test_parity.py`` / ``tests/test_parity_mpi.py``,
``tests/test_file_errors.py`` (the server's limits) and ``tests/test_h5.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from conftest import bfs_file
from mpiburst import File, Request
from mpiburst.writeback import BLOB_SLACK, DEFAULT_BUFFER

pytestmark = pytest.mark.timeout(60)

RW = MPI.MODE_CREATE | MPI.MODE_RDWR


def pattern(n: int, seed: int = 0) -> bytes:
    """Return ``n`` reproducible pseudo-random bytes."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def open_(name: str, amode: int = RW, **hints: str) -> File:
    """Open ``burst://name`` on COMM_SELF with optional hints."""
    info = MPI.INFO_NULL
    if hints:
        info = MPI.Info.Create()
        for k, v in hints.items():
            info.Set(k, v)
    f = File.Open(MPI.COMM_SELF, f"burst://{name}", amode, info)
    if hints:
        info.Free()
    return f


def read_all(f: File, offset: int, n: int) -> tuple[bytes, int]:
    """Read ``n`` bytes at ``offset``; return (the bytes read, the status count)."""
    buf = bytearray(n)
    st = MPI.Status()
    f.Read_at(offset, buf, st)
    count = st.Get_count(MPI.BYTE)
    return bytes(buf[:count]), count


# --------------------------------------------------------------------------- basics

def test_open_returns_burst_file_and_roundtrips(mem_tier):
    data = pattern(10_000, 1)
    with open_("a.dat") as f:
        assert isinstance(f, File)
        st = MPI.Status()
        f.Write_at(0, data, st)
        assert st.Get_count(MPI.BYTE) == len(data)
        assert f.Get_size() == len(data)
        assert read_all(f, 0, len(data)) == (data, len(data))
        assert f.Get_amode() == RW


def test_plain_path_goes_to_mpi_file(mem_tier, tmp_path):
    f = File.Open(MPI.COMM_SELF, str(tmp_path / "plain.dat"), RW)
    try:
        assert type(f) is MPI.File
        f.Write_at(0, b"plain")
    finally:
        f.Close()
    assert (tmp_path / "plain.dat").read_bytes() == b"plain"
    assert mem_tier.store.files() == {}


def test_buffer_specs_write_the_named_bytes(mem_tier):
    arr = np.arange(16, dtype=np.float64)
    raw = arr.tobytes()
    with open_("specs.dat") as f:
        f.Write_at(0, arr)                                   # numpy array
        f.Write_at(200, b"bytes")                            # bytes
        f.Write_at(300, memoryview(bytearray(b"memview")))  # memoryview
        f.Write_at(400, [b"byteslist", MPI.BYTE])            # [buf, type]
        f.Write_at(500, [arr, 3, MPI.DOUBLE])                # [buf, count, type]
        f.Write_at(600, [arr, (2, 5), MPI.DOUBLE])           # [buf, (count, displ), type]
        f.Write_at(700, [arr, 2, 7, MPI.DOUBLE])             # [buf, count, displ, type]
        f.Write_at(800, [b"typecode", "b"])                  # typecode
        got, _ = read_all(f, 0, 900)
    assert got[0:128] == raw
    assert got[200:205] == b"bytes"
    assert got[300:307] == b"memview"
    assert got[400:409] == b"byteslist"
    assert got[500:524] == raw[:24]
    assert got[600:616] == raw[40:56]
    assert got[700:716] == raw[56:72]
    assert got[800:808] == b"typecode"


def test_read_into_numpy_with_datatype(mem_tier):
    arr = np.linspace(0, 1, 100)
    with open_("np.dat") as f:
        f.Write_at(0, arr)
        out = np.zeros(100)
        st = MPI.Status()
        f.Read_at(0, [out, MPI.DOUBLE], st)
        assert st.Get_count(MPI.DOUBLE) == 100
    assert np.array_equal(out, arr)


def test_close_to_open_and_reopen_without_create(mem_tier):
    data = pattern(5000, 2)
    with open_("c2o.dat") as f:
        f.Write_at(100, data)
    with open_("c2o.dat", MPI.MODE_RDONLY) as g:
        assert g.Get_size() == 5100
        got, n = read_all(g, 0, 5100)
    assert n == 5100 and got == bytes(100) + data


def test_context_manager_closes_and_later_calls_fail(mem_tier):
    with open_("cm.dat") as f:
        f.Write_at(0, b"x")
    with pytest.raises(MPI.Exception) as exc:
        f.Write_at(0, b"y")
    assert exc.value.Get_error_class() == MPI.ERR_FILE


# --------------------------------------------------------------------------- reads

def test_holes_read_as_zeros_and_eof_is_short(mem_tier):
    with open_("holes.dat") as f:
        f.Write_at(1000, b"A" * 10)
        f.Write_at(5000, b"B" * 10)
        got, n = read_all(f, 0, 8000)
        assert n == 5010
        assert got == bytes(1000) + b"A" * 10 + bytes(3990) + b"B" * 10
        assert read_all(f, 5010, 10) == (b"", 0)
        assert read_all(f, 9999, 10) == (b"", 0)


def test_mixed_read_tier_bfs_hole_and_past_eof(mem_tier):
    base = pattern(4096, 3)
    with open(bfs_file(mem_tier, "mixed.dat"), "wb") as fh:
        fh.write(base)
    with open_("mixed.dat", MPI.MODE_RDWR) as f:
        assert f.Get_size() == 4096
        f.Write_at(1000, b"T" * 100)       # tier over BFS bytes
        f.Write_at(6000, b"U" * 100)       # leaves a hole [4096, 6000)
        got, n = read_all(f, 0, 10_000)
    assert n == 6100
    expect = bytearray(base) + bytearray(6100 - 4096)
    expect[1000:1100] = b"T" * 100
    expect[6000:6100] = b"U" * 100
    assert got == bytes(expect)


def test_tier_bytes_win_over_bfs_bytes(mem_tier):
    with open(bfs_file(mem_tier, "win.dat"), "wb") as fh:
        fh.write(b"B" * 300)
    with open_("win.dat", MPI.MODE_RDWR) as f:
        f.Write_at(0, b"T" * 300)
        assert read_all(f, 0, 300) == (b"T" * 300, 300)
    assert open(bfs_file(mem_tier, "win.dat"), "rb").read() == b"B" * 300   # BFS untouched until a flush


def test_range_read_fetches_only_overlapping_extents(mem_tier, monkeypatch):
    """Reads use the offset index: a small read fetches O(1) extents, not all of them."""
    with open_("index.dat", mpiburst_wr_buffer="64K") as f:
        for i in range(2000):
            f.Write_at(i * 100, bytes([i % 251]) * 50)   # 2000 separate extents
        f.Sync()
        fetched = []
        store = mem_tier.store
        real_fetch = store.fetch_into

        def counting(path, extents, lo, out):
            extents = list(extents)
            fetched.append(len(extents))
            return real_fetch(path, extents, lo, out)

        monkeypatch.setattr(store, "fetch_into", counting)
        got, _ = read_all(f, 1000 * 100, 150)
    assert got == bytes([1000 % 251]) * 50 + bytes(50) + bytes([1001 % 251]) * 50
    assert fetched == [2]


# --------------------------------------------------------------------------- writes

def test_batches_fill_the_buffer_less_the_slack_and_keep_small_writes_whole(mem_tier):
    """1 MiB writes fill each 4 MiB batch to the brim less BLOB_SLACK (the server's 4 MiB class, not 5);
    200 KiB writes never straddle two batches; a 16 MiB write goes out in room-sized blobs."""
    room = DEFAULT_BUFFER - BLOB_SLACK
    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, 10 << 20, dtype=np.uint8)
    with open_("fill.dat") as f:
        for i in range(10):
            f.Write_at(i << 20, big[i << 20:(i + 1) << 20])
    store = mem_tier.store
    sizes = [b[3] for b in sorted(store.blobs(bfs_file(mem_tier, "fill.dat")))]
    assert sizes == [room, room, (10 << 20) - 2 * room]
    small = 200 << 10
    with open_("whole.dat") as f:
        for i in range(50):
            f.Write_at(i * small, big[i * small:(i + 1) * small])
    sizes = [b[3] for b in store.blobs(bfs_file(mem_tier, "whole.dat"))]
    assert sum(sizes) == 50 * small and all(n % small == 0 and n <= room for n in sizes)
    with open_("direct.dat") as f:
        f.Write_at(0, big[:16 << 20 >> 1])
        f.Write_at(5 << 20, big[:10 << 20])
    sizes = sorted(b[3] for b in store.blobs(bfs_file(mem_tier, "direct.dat")))
    assert max(sizes) == room and sum(sizes) == 18 << 20
    with open_("fill.dat", MPI.MODE_RDONLY) as f:
        assert read_all(f, 0, 10 << 20)[0] == big.tobytes()
    with open_("direct.dat", MPI.MODE_RDONLY) as f:
        assert read_all(f, 0, 15 << 20)[0] == big[:5 << 20].tobytes() + big[:10 << 20].tobytes()


def _entries(tier, name: str) -> list:
    """The index entries of a file, compact (a strided run is one entry)."""
    return tier.store.extents_from(bfs_file(tier, name), 0, 1 << 20)


def test_a_vector_view_costs_index_entries_per_batch_not_per_block(mem_tier, tmp_path):
    """8 MiB through a vector view of 4 KiB blocks (2048 blocks): one strided entry per batch,
    the same bytes as MPI.File, and a later overlapping write wins over the blocks it covers."""
    block, nblocks = 4096, 2048
    vec = MPI.BYTE.Create_vector(nblocks, block, 2 * block).Commit()
    data = np.frombuffer(pattern(block * nblocks, 11), dtype=np.uint8)
    patch = pattern(3 * block + 100, 12)
    ref_path = str(tmp_path / "ref.dat")
    filled = 0
    for opener in (lambda: open_("vec.dat"), lambda: MPI.File.Open(MPI.COMM_SELF, ref_path, RW)):
        f = opener()
        f.Write_at(0, bytes(2 * block * nblocks))   # defined gaps (ROMIO's data sieving leaves garbage in holes)
        f.Sync()
        filled = filled or len(_entries(mem_tier, "vec.dat"))
        f.Set_view(block // 2, MPI.BYTE, vec)
        f.Write_all(data)
        f.Set_view(0, MPI.BYTE, MPI.BYTE)
        f.Write_at(10 * block + 7, patch)
        f.Close()
    vec.Free()
    entries = _entries(mem_tier, "vec.dat")
    strided = [e for e in entries if type(e).__name__ == "Strided"]
    batches = -(-nblocks // ((DEFAULT_BUFFER - BLOB_SLACK) // block))      # 1023 blocks per batch: 3
    assert len(strided) == batches and sum(e.nblocks for e in strided) == nblocks
    assert len(entries) == filled + batches + 1                              # + the patch
    with open_("vec.dat", MPI.MODE_RDONLY) as f:
        got, n = read_all(f, 0, 1 << 25)
    with open(ref_path, "rb") as ref:
        assert got == ref.read() and n == 2 * block * nblocks
    mpiburst.sync("burst://vec.dat")
    with open(bfs_file(mem_tier, "vec.dat"), "rb") as out, open(ref_path, "rb") as ref:
        assert out.read() == ref.read()


def test_records_at_a_fixed_stride_become_one_entry(mem_tier):
    """Write_at of equal records at a fixed stride (the strided benchmark pattern) extends one strided entry;
    a write in between starts a new entry, so the later write still wins."""
    rec = 4096
    with open_("stride.dat") as f:
        for i in range(100):
            f.Write_at(rec + i * 2 * rec, pattern(rec, i))
        f.Write_at(rec + 3 * 2 * rec, b"X" * 10)           # overwrites the start of record 3
        for i in range(100, 110):
            f.Write_at(rec + i * 2 * rec, pattern(rec, i))
        f.Sync()
        entries = _entries(mem_tier, "stride.dat")
        got, _ = read_all(f, 0, 221 * rec)
    assert [getattr(e, "nblocks", 1) for e in entries] == [100, 1, 10]
    expect = bytearray(220 * rec)
    for i in range(110):
        expect[rec + 2 * i * rec:2 * rec + 2 * i * rec] = pattern(rec, i)
    expect[7 * rec:7 * rec + 10] = b"X" * 10
    assert got == bytes(expect)


def test_last_write_wins_within_rank(mem_tier):
    with open_("lww.dat", mpiburst_wr_buffer="1K") as f:
        f.Write_at(0, b"a" * 2000)      # larger than the buffer: sent directly
        f.Write_at(500, b"b" * 100)     # buffered
        f.Write_at(550, b"c" * 10)      # buffered, overlaps the buffered write
        f.Sync()
        f.Write_at(520, b"d" * 5)       # after a push
        got, _ = read_all(f, 0, 2000)
    expect = bytearray(b"a" * 2000)
    expect[500:600] = b"b" * 100
    expect[550:560] = b"c" * 10
    expect[520:525] = b"d" * 5
    assert got == bytes(expect)


def test_small_writes_are_coalesced_until_sync(mem_tier):
    store = mem_tier.store
    with open_("coal.dat") as f:
        for i in range(1000):
            f.Write_at(i * 100, bytes([i % 256]) * 100)
        path = bfs_file(mem_tier, "coal.dat")
        assert store.blobs(path) == []                    # all 100 KB still buffered
        with open_("coal.dat", MPI.MODE_RDONLY) as other:
            assert other.Get_size() == 0                  # not visible before Sync
        f.Sync()
        blobs = store.blobs(path)
        assert len(blobs) == 1 and blobs[0][3] == 100_000  # one batch, one round trip
        with open_("coal.dat", MPI.MODE_RDONLY) as other:
            got, n = read_all(other, 0, 100_000)
    assert n == 100_000
    assert got == b"".join(bytes([i % 256]) * 100 for i in range(1000))


def test_write_buffer_hint_and_environment(mem_tier, monkeypatch):
    with open_("hint.dat", mpiburst_wr_buffer="64K") as f:
        info = f.Get_info()
        assert info.Get("mpiburst_wr_buffer") == str(64 << 10)
        info.Free()
    monkeypatch.setenv("MPIBURST_WR_BUFFER", "128K")
    with open_("env.dat") as f:
        info = f.Get_info()
        assert info.Get("mpiburst_wr_buffer") == str(128 << 10)
        info.Free()
    monkeypatch.delenv("MPIBURST_WR_BUFFER")
    with open_("default.dat") as f:
        info = f.Get_info()
        assert info.Get("mpiburst_wr_buffer") == str(DEFAULT_BUFFER)
        info.Free()


def test_buffer_overflow_pushes_and_keeps_order(mem_tier):
    data = pattern(300_000, 4)
    with open_("ovf.dat", mpiburst_wr_buffer="16K") as f:
        for start in range(0, len(data), 7000):
            f.Write_at(start, data[start:start + 7000])
        f.Write_at(0, b"Z" * 10)
        got, _ = read_all(f, 0, len(data))
    assert got == b"Z" * 10 + data[10:]
    assert len(mem_tier.store.blobs(bfs_file(mem_tier, "ovf.dat"))) > 10


def test_atomic_mode_pushes_each_write(mem_tier):
    with open_("atom.dat") as f:
        assert f.Get_atomicity() is False
        f.Set_atomicity(True)
        assert f.Get_atomicity() is True
        f.Write_at(0, b"visible")
        with open_("atom.dat", MPI.MODE_RDONLY) as other:
            assert read_all(other, 0, 7) == (b"visible", 7)


def test_nonblocking_requests(mem_tier):
    with open_("nb.dat") as f:
        reqs = [f.Iwrite_at(i * 10, bytes([65 + i]) * 10) for i in range(5)]
        reqs.append(f.Iwrite_at_all(50, b"F" * 10))
        statuses = [MPI.Status() for _ in reqs]
        assert Request.Waitall(reqs, statuses)
        assert [s.Get_count(MPI.BYTE) for s in statuses] == [10] * 6
        buf = bytearray(60)
        r = f.Iread_at(0, buf)
        st = MPI.Status()
        assert r.Test(st) is True
        assert st.Get_count(MPI.BYTE) == 60
    assert bytes(buf) == b"".join(bytes([65 + i]) * 10 for i in range(6))


def test_split_collective_write(mem_tier):
    with open_("split.dat") as f:
        f.Write_at_all_begin(3, b"split")
        st = MPI.Status()
        f.Write_at_all_end(b"split", st)
        assert st.Get_count(MPI.BYTE) == 5
        assert read_all(f, 0, 8) == (bytes(3) + b"split", 8)


def test_collective_forms(mem_tier):
    with open_("coll.dat") as f:
        f.Write_at_all(0, b"0123456789")
        buf = bytearray(4)
        f.Read_at_all(3, buf)
        assert bytes(buf) == b"3456"
        f.Seek(2)
        f.Write_all(b"ab")
        assert f.Get_position() == 4
        f.Seek(0)
        buf = bytearray(5)
        f.Read_all(buf)
        assert bytes(buf) == b"01ab4" and f.Get_position() == 5


# --------------------------------------------------------------------------- pointers, views

def test_individual_file_pointer(mem_tier):
    with open_("ptr.dat") as f:
        assert f.Get_position() == 0
        f.Write(b"hello")
        assert f.Get_position() == 5
        f.Write(b" world")
        assert f.Get_position() == 11
        f.Seek(-5, MPI.SEEK_CUR)
        buf = bytearray(5)
        f.Read(buf)
        assert bytes(buf) == b"world" and f.Get_position() == 11
        f.Seek(0, MPI.SEEK_END)
        assert f.Get_position() == 11
        f.Seek(-11, MPI.SEEK_END)
        st = MPI.Status()
        buf = bytearray(20)
        f.Read(buf, st)                       # short read advances by what was read
        assert st.Get_count(MPI.BYTE) == 11 and f.Get_position() == 11
        with pytest.raises(MPI.Exception):
            f.Seek(-1, MPI.SEEK_SET)


def test_set_view_displacement_and_double_etype(mem_tier):
    header = b"HDR!" * 16
    vals = np.arange(10, dtype=np.float64) * 1.5
    with open_("view.dat") as f:
        f.Write_at(0, header)
        f.Set_view(64, MPI.DOUBLE)
        disp, etype, filetype, rep = f.Get_view()
        assert disp == 64 and etype == MPI.DOUBLE and rep == "native"
        assert f.Get_position() == 0
        f.Write_at(2, vals[2:5])                  # offset in doubles
        f.Seek(5)
        f.Write(vals[5:])
        assert f.Get_position() == 10
        assert f.Get_byte_offset(3) == 64 + 24
        f.Seek(0, MPI.SEEK_END)
        assert f.Get_position() == 10
        out = np.full(10, -1.0)
        f.Read_at(0, out)
        f.Set_view(0, MPI.BYTE)
        raw, _ = read_all(f, 0, 64 + 80)
    assert np.array_equal(out[2:], vals[2:]) and np.array_equal(out[:2], np.zeros(2))
    assert raw[:64] == header


# --------------------------------------------------------------------------- size, modes

def test_set_size_truncates_and_extends_with_zeros(mem_tier):
    with open(bfs_file(mem_tier, "trunc.dat"), "wb") as fh:
        fh.write(b"B" * 1000)
    with open_("trunc.dat", MPI.MODE_RDWR) as f:
        f.Write_at(1000, b"T" * 1000)
        f.Set_size(500)
        assert f.Get_size() == 500
        assert read_all(f, 0, 2000) == (b"B" * 500, 500)
        f.Set_size(1500)                   # extension: zeros, not the old BFS or tier bytes
        assert f.Get_size() == 1500
        assert read_all(f, 0, 2000) == (b"B" * 500 + bytes(1000), 1500)
        f.Write_at(1400, b"N" * 10)
        assert read_all(f, 1390, 30) == (bytes(10) + b"N" * 10 + bytes(10), 30)


def test_preallocate_only_grows(mem_tier):
    with open_("pre.dat") as f:
        f.Write_at(0, b"x" * 100)
        f.Preallocate(50)
        assert f.Get_size() == 100
        f.Preallocate(4096)
        assert f.Get_size() == 4096
        assert read_all(f, 0, 4096) == (b"x" * 100 + bytes(3996), 4096)


def test_mode_append_starts_at_end(mem_tier):
    with open_("app.dat") as f:
        f.Write_at(0, b"first")
    with open_("app.dat", MPI.MODE_WRONLY | MPI.MODE_APPEND) as f:
        assert f.Get_position() == 5
        f.Write(b"+second")
    with open_("app.dat", MPI.MODE_RDONLY) as f:
        assert read_all(f, 0, 100) == (b"first+second", 12)


def test_mode_delete_on_close(mem_tier):
    path = bfs_file(mem_tier, "doc.dat")
    with open(path, "wb") as fh:
        fh.write(b"old")
    with open_("doc.dat", MPI.MODE_RDWR | MPI.MODE_DELETE_ON_CLOSE) as f:
        f.Write_at(0, b"scratch")
    assert not os.path.exists(path)
    assert mem_tier.store.meta(path) is None
    with pytest.raises(MPI.Exception) as exc:
        open_("doc.dat", MPI.MODE_RDONLY)
    assert exc.value.Get_error_class() == MPI.ERR_NO_SUCH_FILE


def test_delete(mem_tier):
    path = bfs_file(mem_tier, "del.dat")
    with open_("del.dat") as f:
        f.Write_at(0, b"x")
    File.Delete("burst://del.dat")
    assert mem_tier.store.meta(path) is None and not os.path.exists(path)
    with pytest.raises(MPI.Exception) as exc:
        File.Delete("burst://del.dat")
    assert exc.value.Get_error_class() == MPI.ERR_NO_SUCH_FILE


def test_group_and_type_extent(mem_tier):
    with open_("misc.dat") as f:
        g = f.Get_group()
        assert g.Get_size() == 1
        g.Free()
        assert f.Get_type_extent(MPI.DOUBLE) == 8


# --------------------------------------------------------------------------- with the flush

def test_sync_then_flush_makes_the_bfs_file(mem_tier):
    data = pattern(3 * (1 << 20) + 123, 5)
    with open_("ck.dat") as f:
        for start in range(0, len(data), 47_008):
            f.Write_at(start, data[start:start + 47_008])
        f.Sync()
        mpiburst.sync("burst://ck.dat", tier=mem_tier)
        assert open(bfs_file(mem_tier, "ck.dat"), "rb").read() == data
        assert mpiburst.purge("burst://ck.dat", clean_only=True, tier=mem_tier) >= len(data)
        assert mem_tier.store.blobs(bfs_file(mem_tier, "ck.dat")) == []
        got, n = read_all(f, 0, len(data))                      # now from the BFS
    assert n == len(data) and got == data


def test_open_handle_survives_a_full_purge_of_a_clean_file(mem_tier):
    """A full purge (record dropped) of a synced file must leave an open handle reading the BFS copy."""
    data = pattern(100_000, 6)
    with open_("pg.dat") as f:
        f.Write_at(0, data)
        f.Sync()
        mpiburst.sync("burst://pg.dat", tier=mem_tier)
        mpiburst.purge("burst://pg.dat", tier=mem_tier)
        assert f.Get_size() == len(data)
        assert read_all(f, 0, len(data)) == (data, len(data))
        f.Write_at(10, b"new")
        got, n = read_all(f, 0, len(data))
    assert n == len(data) and got == data[:10] + b"new" + data[13:]
