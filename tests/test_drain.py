"""The drain (mpiburst.drain): full chunks of a new file written to the BFS while it is written.

Unit tests on the memory store (the ``mem_tier`` fixture: the drain reads the
tier through the ``Store`` interface), ``mpiburst.File`` on ``COMM_SELF``; the
drain with real ranks and a real server is ``tests/test_drain_mpi.py``. The
chunk is made small (two stripes) so a few hundred KiB exercise it; each test
waits, bounded, for the drain to have written a chunk before it goes on.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
from mpi4py import MPI

from conftest import bfs_file
from mpiburst import File, drain, flush

pytestmark = pytest.mark.timeout(60)

RW = MPI.MODE_CREATE | MPI.MODE_RDWR


@pytest.fixture
def chunk(mem_tier, monkeypatch) -> int:
    """Turn the drain on and make its chunk two stripes of the tier; return its size in bytes."""
    monkeypatch.setattr(drain, "CHUNK", 2 * mem_tier.align)
    monkeypatch.setenv(drain.ENV, "1")
    return drain.chunk_bytes(mem_tier.align)


def pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def leftovers(tier, name: str) -> list[str]:
    return glob.glob(os.path.join(os.path.realpath(tier.bfs_root), f".{name}.mpiburst-*"))


def wait_drained(f: File, chunks: set[int], timeout: float = 20.0) -> None:
    """Wait until the file's drain has written ``chunks`` (a bounded wait for that condition)."""
    deadline = time.monotonic() + timeout
    while not chunks <= set(f._drain.done):
        assert time.monotonic() < deadline, f"the drain wrote {sorted(f._drain.done)}, not {sorted(chunks)}"
        time.sleep(0.01)


def test_drained_chunks_are_kept_and_the_rest_is_flushed(mem_tier, chunk):
    data = pattern(3 * chunk + 1000, 1)        # three full chunks and a partial one
    f = File.Open(MPI.COMM_SELF, "burst://d.dat", RW)
    assert f._drain is not None
    f.Write_at(0, data[:2 * chunk])
    f.Sync()
    wait_drained(f, {0, 1})
    f.Write_at(2 * chunk, data[2 * chunk:])
    f.Close()
    rep = flush.sync("burst://d.dat", tier=mem_tier)
    assert open(bfs_file(mem_tier, "d.dat"), "rb").read() == data
    assert rep.drained >= 2 * chunk            # the flush kept what the drain wrote ...
    assert rep.bytes + rep.drained == len(data)  # ... and wrote only the rest
    assert leftovers(mem_tier, "d.dat") == []
    assert not mem_tier.store.meta(bfs_file(mem_tier, "d.dat")).dirty


def test_a_chunk_written_again_after_it_was_drained_is_flushed_with_the_new_bytes(mem_tier, chunk):
    old, new = pattern(2 * chunk, 2), pattern(100, 3)
    f = File.Open(MPI.COMM_SELF, "burst://w.dat", RW)
    f.Write_at(0, old)
    f.Sync()
    wait_drained(f, {0, 1})
    f._drain.stop()                            # chunk 0 must stay as drained, with the older bytes
    f.Write_at(chunk + 10, new)                # chunk 1 again
    f.Close()
    rep = flush.sync("burst://w.dat", tier=mem_tier)
    want = bytearray(old)
    want[chunk + 10:chunk + 110] = new
    assert open(bfs_file(mem_tier, "w.dat"), "rb").read() == bytes(want)
    assert rep.drained == chunk                # chunk 0 kept, chunk 1 written again


def test_a_cut_older_than_the_drained_bytes_is_published_as_cut(mem_tier, chunk):
    """A commit whose cut precedes the drain's bytes must not publish them (docs/reliability.md)."""
    first, second = pattern(2 * chunk, 4), pattern(2 * chunk, 5)
    target = bfs_file(mem_tier, "c.dat")
    f = File.Open(MPI.COMM_SELF, "burst://c.dat", RW)
    f.Write_at(0, first)
    f.Sync()
    cut = mem_tier.store.cut()[target]             # the consistent cut: the first bytes
    f._drain._next = 0
    f._drain.done.clear()
    f._drain.stop()
    f.Write_at(0, second)                      # newer than the cut ...
    f.Sync()
    again = drain.Drain(mem_tier.store, target, "t" * 16, mem_tier.align, 0, 1)
    deadline = time.monotonic() + 20
    while len(again.done) < 2:                 # ... and drained (a drain of another open, say)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    again.stop()
    again.publish()
    f.Close()
    plan = flush.snapshot.prepare(mem_tier.store, target, mem_tier.align, cut=cut)
    assert plan is not None and plan.claimed is not None and plan.upto < max(u for u, _, _ in plan.claimed.done.values())
    tally = flush.writes.Tally()
    flush.writes.write_run(mem_tier.store, plan, [flush.locality.stripe_range(plan, 0, 1)], tally, 1)
    flush.writes.finish(mem_tier.store, plan, False)
    assert open(target, "rb").read() == first  # the cut, not the drained newer bytes
    assert tally.drained == 0
    assert mem_tier.store.meta(target).dirty       # the newer writes stay dirty


def test_a_file_on_the_bfs_already_is_not_drained(mem_tier, chunk):
    with open(bfs_file(mem_tier, "e.dat"), "wb") as out:
        out.write(b"x" * 10)
    f = File.Open(MPI.COMM_SELF, "burst://e.dat", RW)
    assert f._drain is None
    f.Close()


@pytest.mark.parametrize("setting", [None, "0"])
def test_off_by_default_and_when_turned_off(mem_tier, chunk, monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv(drain.ENV, raising=False)
    else:
        monkeypatch.setenv(drain.ENV, setting)
    f = File.Open(MPI.COMM_SELF, "burst://off.dat", RW)
    assert f._drain is None
    f.Write_at(0, pattern(3 * chunk, 6))
    f.Close()
    assert leftovers(mem_tier, "off.dat") == []


def test_delete_removes_what_the_drain_left(mem_tier, chunk):
    f = File.Open(MPI.COMM_SELF, "burst://del.dat", RW)
    f.Write_at(0, pattern(2 * chunk, 7))
    f.Sync()
    wait_drained(f, {0})
    f.Close()
    assert leftovers(mem_tier, "del.dat")          # the data file and its record wait for a flush
    File.Delete("burst://del.dat")
    assert leftovers(mem_tier, "del.dat") == []


def test_a_data_file_replaced_meanwhile_is_not_claimed(mem_tier, chunk):
    data = pattern(2 * chunk, 8)
    f = File.Open(MPI.COMM_SELF, "burst://r.dat", RW)
    f.Write_at(0, data)
    f.Sync()
    wait_drained(f, {0, 1})
    f.Close()
    [record] = glob.glob(os.path.join(os.path.realpath(mem_tier.bfs_root), ".r.dat.mpiburst-drain-*.json"))
    path = record[:-len(".0.json")]
    os.unlink(path)
    with open(path, "wb") as out:              # another file at the data file's path: never trusted
        out.write(b"\0" * len(data))
    rep = flush.sync("burst://r.dat", tier=mem_tier)
    assert rep.drained == 0
    assert open(bfs_file(mem_tier, "r.dat"), "rb").read() == data
    assert leftovers(mem_tier, "r.dat") == []
