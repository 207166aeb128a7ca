"""The MPI-IO driver under real ranks: run with ``mpiexec -n 2`` and ``-n 4``.

``python -m mpi4py -m pytest --with-mpi tests/test_file_mpi.py``. Every test
starts a real server collectively (conftest's ``world_tier``:
``Tier.start(COMM_WORLD)``, one channel per rank) in the broadcast
``mpi_tmp_path`` and checks, on every rank, the bytes all ranks wrote, against
a reference image built identically on every rank.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from conftest import bfs_file
from mpiburst import File, Request

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

RW = MPI.MODE_CREATE | MPI.MODE_RDWR
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def read_all(f, offset: int, n: int) -> tuple[bytes, int]:
    buf = bytearray(n)
    st = MPI.Status()
    f.Read_at(offset, buf, st)
    count = st.Get_count(MPI.BYTE)
    return bytes(buf[:count]), count


def sync_barrier_sync(f) -> None:
    f.Sync()
    comm.Barrier()
    f.Sync()


# --------------------------------------------------------------------------- patterns

def test_channels_follow_ranks(world_tier):
    assert world_tier.channels == size
    with File.Open(comm, "burst://chan.dat", RW) as f:
        info = f.Get_info()
        assert info.Get("mpiburst_channel") == str(rank % size)
        info.Free()


def test_n1_segmented(world_tier):
    seg = 300_000 + 17
    mine = pattern(seg, rank)
    with File.Open(comm, "burst://seg.dat", RW) as f:
        pos = 0
        for chunk in (1, 4095, 65_536, 100_000):          # uneven chunks, unaligned
            f.Write_at(rank * seg + pos, mine[pos:pos + chunk])
            pos += chunk
        f.Write_at(rank * seg + pos, mine[pos:])
        sync_barrier_sync(f)
        assert f.Get_size() == size * seg
        got, n = read_all(f, 0, size * seg + 10)
    assert n == size * seg
    assert got == b"".join(pattern(seg, r) for r in range(size))


def test_n1_strided_47008_byte_records_then_flush(world_tier):
    rec, nrec = 47_008, 12 * size
    with File.Open(comm, "burst://strided.dat", RW) as f:
        for i in range(rank, nrec, size):
            f.Write_at_all(i * rec, pattern(rec, i))
        sync_barrier_sync(f)
        got, n = read_all(f, 0, nrec * rec)
    expect = b"".join(pattern(rec, i) for i in range(nrec))
    assert n == nrec * rec and got == expect
    report = mpiburst.sync("burst://strided.dat", tier=world_tier, comm=comm)
    assert report is not None
    with open(bfs_file(world_tier, "strided.dat"), "rb") as fh:
        assert fh.read() == expect


def test_nn_file_per_rank_close_to_open(world_tier):
    data = pattern(123_457, 100 + rank)
    with File.Open(MPI.COMM_SELF, f"burst://nn/rank{rank}.dat", RW) as f:
        f.Write_at(0, data)
    comm.Barrier()
    other = (rank + 1) % size
    with File.Open(MPI.COMM_SELF, f"burst://nn/rank{other}.dat", MPI.MODE_RDONLY) as f:
        assert f.Get_size() == 123_457
        got, _ = read_all(f, 0, 123_457)
    assert got == pattern(123_457, 100 + other)


def test_random_writes_against_reference_model(world_tier):
    """Rounds of random writes (shared seed): overlapping ones ordered by sync-barrier-sync, disjoint ones concurrent."""
    seed = comm.bcast(int(os.environ.get("MPIBURST_TEST_SEED") or random.randrange(1 << 30)) if rank == 0 else None)
    rng = random.Random(seed)                      # same stream on every rank
    model = bytearray()

    def apply(off: int, data: bytes) -> None:
        if off + len(data) > len(model):
            model.extend(bytes(off + len(data) - len(model)))
        model[off:off + len(data)] = data

    info = MPI.Info.Create()
    info.Set("mpiburst_wr_buffer", "32K")
    f = File.Open(comm, "burst://rand.dat", RW, info)   # no `with`: a failed assert must reach pytest
    for rnd in range(12):
        if rnd % 3 == 2:                       # concurrent round: each rank its own region
            for r in range(size):
                off, n = r * 70_000 + rng.randrange(20_000), rng.randrange(1, 50_000)
                data = rng.randbytes(n)
                if r == rank:
                    f.Write_at(off, data)
                apply(off, data)
        else:                                  # one writer, overlapping writes of its own
            writer = rng.randrange(size)
            for _ in range(rng.randrange(1, 6)):
                off, n = rng.randrange(300_000), rng.randrange(1, 80_000)
                data = rng.randbytes(n)
                if writer == rank:
                    f.Write_at(off, data)
                apply(off, data)
        sync_barrier_sync(f)
        assert f.Get_size() == len(model)
        for _ in range(5):
            off, n = rng.randrange(len(model) + 100), rng.randrange(1, 100_000)
            got, count = read_all(f, off, n)
            assert count == max(0, min(n, len(model) - off))
            assert got == bytes(model[off:off + count]), f"round {rnd}: [{off}, {off + n}) differs (seed {seed})"
        comm.Barrier()                         # nobody writes the next round while others still read
    got, count = read_all(f, 0, len(model))
    assert got == bytes(model), f"seed {seed}"
    f.Close()
    info.Free()


# --------------------------------------------------------------------------- overlaps and order

def test_overlaps_between_ranks_by_arrival_order(world_tier):
    with File.Open(comm, "burst://order.dat", RW) as f:
        for r in range(size):                      # rank r writes [r*100, r*100+1000) after r-1
            if rank == r:
                f.Write_at(r * 100, bytes([65 + r]) * 1000)
            sync_barrier_sync(f)
        if rank == 0:                              # a later write by the first rank wins again
            f.Write_at(150, b"z" * 10)
        sync_barrier_sync(f)
        got, n = read_all(f, 0, 5000)
    expect = bytearray()
    for r in range(size):
        end = r * 100 + 1000
        expect.extend(bytes(max(0, end - len(expect))))
        expect[r * 100:end] = bytes([65 + r]) * 1000
    expect[150:160] = b"z" * 10
    assert n == len(expect) and got == bytes(expect)


def test_vector_views_interleave_as_strided_runs_and_flush(world_tier):
    """Every rank writes its interleaved blocks through a vector view with one Write_all: one strided
    index entry per rank; a later view shifted by half a block and a later contiguous write win where
    they land, in arrival order; reads and the flushed BFS file match the reference image."""
    block, nblocks = 4096, 300
    stride = size * block
    vec = MPI.BYTE.Create_vector(nblocks, block, stride).Commit()
    mine = pattern(block * nblocks, rank)
    with File.Open(comm, "burst://views.dat", RW) as f:
        f.Set_view(rank * block, MPI.BYTE, vec)
        f.Write_all(mine)
        sync_barrier_sync(f)
        entries = world_tier.store.extents_from(bfs_file(world_tier, "views.dat"), 0, 100_000)
        half = MPI.BYTE.Create_vector(50, block, stride).Commit()
        f.Set_view(block // 2, MPI.BYTE, half)      # collective; each rank may give its own view
        half.Free()
        if rank == 0:                              # then rank 0 overwrites half of each of 50 slots
            f.Write(b"H" * (50 * block))
        sync_barrier_sync(f)
        f.Set_view(0, MPI.BYTE, MPI.BYTE)
        if rank == size - 1:                       # and the last rank writes across many blocks at once
            f.Write_at(10 * stride + 100, b"C" * (5 * stride))
        sync_barrier_sync(f)
        got, n = read_all(f, 0, nblocks * stride)
    vec.Free()
    expect = bytearray(nblocks * stride)
    for r in range(size):
        data = pattern(block * nblocks, r)
        for k in range(nblocks):
            at = r * block + k * stride
            expect[at:at + block] = data[k * block:(k + 1) * block]
    for k in range(50):
        at = block // 2 + k * stride
        expect[at:at + block] = b"H" * block
    expect[10 * stride + 100:15 * stride + 100] = b"C" * (5 * stride)
    assert len(entries) == size and all(getattr(e, "nblocks", 1) == nblocks for e in entries)
    assert n == len(expect) and got == bytes(expect)
    mpiburst.sync("burst://views.dat", comm=comm)
    with open(bfs_file(world_tier, "views.dat"), "rb") as out:
        assert out.read() == bytes(expect)


def test_concurrent_overlap_resolves_to_one_writer_per_fragment(world_tier):
    """Unordered writes to one range: the result is one rank's whole write (one fragment), never a mix."""
    n = 100_000                                    # below the 256 KiB fragment size: one fragment each
    with File.Open(comm, "burst://race.dat", RW) as f:
        f.Write_at(0, bytes([rank + 1]) * n)
        sync_barrier_sync(f)
        got, count = read_all(f, 0, n)
    assert count == n
    assert got in [bytes([r + 1]) * n for r in range(size)]
    assert comm.allgather(got) == [got] * size     # every rank sees the same winner


def test_within_rank_last_write_wins(world_tier):
    base = rank * 10_000
    with File.Open(comm, "burst://lww.dat", RW) as f:
        f.Write_at(base, b"a" * 5000)
        f.Write_at(base + 1000, b"b" * 1000)
        f.Write_at(base + 1500, b"c" * 10)
        sync_barrier_sync(f)
        f.Write_at(base + 1200, b"d" * 5)
        sync_barrier_sync(f)
        got, _ = read_all(f, ((rank + 1) % size) * 10_000, 5000)
    expect = bytearray(b"a" * 5000)
    expect[1000:2000] = b"b" * 1000
    expect[1500:1510] = b"c" * 10
    expect[1200:1205] = b"d" * 5
    assert got == bytes(expect)


def test_not_visible_before_sync_visible_after(world_tier):
    with File.Open(comm, "burst://vis.dat", RW) as f:
        if rank == 0:
            f.Write_at(0, b"early")                 # buffered, not pushed
        comm.Barrier()
        if rank == 1:
            assert f.Get_size() == 0
        comm.Barrier()
        sync_barrier_sync(f)
        assert read_all(f, 0, 5) == (b"early", 5)


# --------------------------------------------------------------------------- mixed reads

def test_mixed_read_tier_bfs_hole_past_eof(world_tier):
    base = pattern(10_000, 42)
    if rank == 0:
        with open(bfs_file(world_tier, "mixed.dat"), "wb") as fh:
            fh.write(base)
    comm.Barrier()
    with File.Open(comm, "burst://mixed.dat", MPI.MODE_RDWR) as f:
        assert f.Get_size() == 10_000
        comm.Barrier()                                          # all have looked before anyone writes
        f.Write_at(rank * 1000, bytes([97 + rank]) * 500)      # tier over the BFS bytes
        if rank == size - 1:
            f.Write_at(20_000, b"END")                          # hole [10000, 20000)
        sync_barrier_sync(f)
        got, n = read_all(f, 0, 30_000)                         # past EOF: short
    expect = bytearray(base) + bytearray(10_003)
    for r in range(size):
        expect[r * 1000:r * 1000 + 500] = bytes([97 + r]) * 500
    expect[20_000:20_003] = b"END"
    assert n == 20_003
    assert got == bytes(expect)


# --------------------------------------------------------------------------- size, modes

def test_set_size_collective_truncate_and_extend(world_tier):
    with File.Open(comm, "burst://size.dat", RW) as f:
        f.Write_at(rank * 1000, bytes([65 + rank]) * 1000)
        f.Set_size(size * 1000 - 500)                 # collective; pushes everyone's writes first
        assert f.Get_size() == size * 1000 - 500
        got, n = read_all(f, 0, size * 1000)
        assert n == size * 1000 - 500
        assert got[-500:] == bytes([65 + size - 1]) * 500
        f.Set_size(size * 1000 + 1000)                # extension: zeros where the cut bytes were
        got, n = read_all(f, 0, size * 1000 + 2000)
        assert n == size * 1000 + 1000
        assert got[size * 1000 - 500:] == bytes(1500)
        assert got[:1000] == b"A" * 1000


def test_mode_append(world_tier):
    with File.Open(comm, "burst://app.dat", RW) as f:
        if rank == 0:
            f.Write_at(0, b"H" * 100)
    with File.Open(comm, "burst://app.dat", MPI.MODE_WRONLY | MPI.MODE_APPEND) as f:
        assert f.Get_position() == 100
        f.Seek(rank * 10, MPI.SEEK_CUR)
        f.Write(bytes([48 + rank]) * 10)
        assert f.Get_position() == 100 + (rank + 1) * 10
    with File.Open(comm, "burst://app.dat", MPI.MODE_RDONLY) as f:
        got, n = read_all(f, 0, 1000)
    assert got == b"H" * 100 + b"".join(bytes([48 + r]) * 10 for r in range(size))


def test_mode_delete_on_close(world_tier):
    with File.Open(comm, "burst://tmp.dat", RW | MPI.MODE_DELETE_ON_CLOSE) as f:
        f.Write_at(rank, b"x")
    with pytest.raises(MPI.Exception) as exc:
        File.Open(comm, "burst://tmp.dat", MPI.MODE_RDONLY)
    assert exc.value.Get_error_class() == MPI.ERR_NO_SUCH_FILE
    assert not os.path.exists(bfs_file(world_tier, "tmp.dat"))


def test_open_errors_raise_on_every_rank(world_tier):
    with pytest.raises(MPI.Exception) as exc:
        File.Open(comm, "burst://missing.dat", MPI.MODE_RDONLY)
    assert exc.value.Get_error_class() == MPI.ERR_NO_SUCH_FILE
    File.Open(comm, "burst://there.dat", RW).Close()
    with pytest.raises(MPI.Exception) as exc:
        File.Open(comm, "burst://there.dat", RW | MPI.MODE_EXCL)
    assert exc.value.Get_error_class() == MPI.ERR_FILE_EXISTS


# --------------------------------------------------------------------------- pointers and views

def test_individual_file_pointers(world_tier):
    with File.Open(comm, "burst://ptr.dat", RW) as f:
        f.Seek(rank * 100)
        f.Write(bytes([65 + rank]) * 60)
        assert f.Get_position() == rank * 100 + 60
        f.Seek(-20, MPI.SEEK_CUR)
        f.Write(bytes([97 + rank]) * 20)             # overwrite own tail
        assert f.Get_position() == rank * 100 + 60
        sync_barrier_sync(f)
        f.Seek(0, MPI.SEEK_END)
        assert f.Get_position() == (size - 1) * 100 + 60
        other = (rank + 1) % size
        f.Seek(other * 100)
        buf = bytearray(60)
        f.Read(buf)
        assert f.Get_position() == other * 100 + 60
    assert bytes(buf) == bytes([65 + other]) * 40 + bytes([97 + other]) * 20


def test_set_view_displacement_and_double_etype(world_tier):
    header, n = 128, 1000
    mine = np.arange(n, dtype=np.float64) + rank * n
    with File.Open(comm, "burst://view.dat", RW) as f:
        if rank == 0:
            f.Write_at(0, b"#" * header)
        f.Set_view(header, MPI.DOUBLE)
        f.Seek(rank * n)
        f.Write_all(mine)
        assert f.Get_position() == (rank + 1) * n
        req = f.Iwrite_at_all(size * n + rank, np.array([-1.0 - rank]))
        Request.Waitall([req])
        sync_barrier_sync(f)
        f.Seek(0, MPI.SEEK_END)
        assert f.Get_position() == size * n + size
        allv = np.empty(size * n + size)
        st = MPI.Status()
        f.Read_at_all(0, allv, st)
        assert st.Get_count(MPI.DOUBLE) == size * n + size
        f.Set_view(0, MPI.BYTE)
        head, _ = read_all(f, 0, header)
    assert head == b"#" * header
    assert np.array_equal(allv[:size * n], np.arange(size * n, dtype=np.float64))
    assert np.array_equal(allv[size * n:], -1.0 - np.arange(size))
