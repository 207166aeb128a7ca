"""The flush engine: byte-identical BFS files, aligned writes, durability rules.

Every test compares the BFS file with a reference model (a bytearray image
of the file, updated by the same writes in the same order). Writes go into
the tier with ``Store.commit`` directly, as the driver's batches do.
The reference model and ``put`` come from :mod:`mpiburst.testing`;
``mem_atier``, ``atier`` and ``bfs_file`` from conftest.py.

These are unit tests of the flush on the memory store (``mem_atier``): what
they check is the flush's planning and writing, which sees the tier only
through the ``Store`` interface, and ``tests/test_store.py`` runs that
interface's contract on the memory store and on a real server alike. The
flush against a real server is checked by ``test_bfs_write_calls_seen_by_strace``
here (a flusher process that connects to the run), ``tests/test_flush_faults.py``
(server stopped, flusher killed), ``tests/test_cli_residency.py`` (``mpiburst
sync``) and the MPI tests (``tests/test_flush_mpi.py``, ``tests/test_file_mpi.py``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_tool
from mpiburst import flush, perms, residency
from mpiburst.errors import PathError
from mpiburst.testing import Model, put, put_runs

from conftest import ALIGN, bfs_file, check_aligned

RECORD = 47008
_EXAMPLE = itertools.count()


@pytest.fixture
def writes_seen():
    """Record ``(path, offset, length)`` of every BFS write call the flush makes in this process."""
    seen: list[tuple[str, int, int]] = []
    flush.writes.write_observers.append(lambda p, o, n: seen.append((p, o, n)))
    yield seen
    flush.writes.write_observers.clear()


@pytest.fixture
def small_writes(monkeypatch):
    """Batch at most 4 stripes per BFS write, so small test files still take several writes."""
    monkeypatch.setattr(flush.writes, "WRITE_SIZE", 4 * ALIGN + 123)   # rounded down to whole stripes
    return 4 * ALIGN


# ----------------------------------------------------------------------------- patterns, 1 process

@pytest.mark.timeout(60)
def test_segmented_new_file(mem_atier, writes_seen):
    """Four writers, each a contiguous segment in 47,008-byte transfers: the whole file in one write."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "seg/out.dat")
    store.create(path, None)
    model = Model()
    seg = 1 << 20
    rnd = random.Random(1)
    for rank in range(4):
        writes = [(rank * seg + o, rnd.randbytes(min(RECORD, seg - o))) for o in range(0, seg, RECORD)]
        put(store, path, model, writes, channel=rank)
    rep = flush.sync(path, tier=mem_atier, verify=True)
    assert open(path, "rb").read() == bytes(model.data)
    assert rep.size == len(model.data) == 4 * seg
    assert rep.writes == len(writes_seen) == 1                       # not 4 x 23 fragments
    assert rep.write_sizes == {4 * seg: 1}
    assert rep.checksum == hashlib.sha256(model.data).hexdigest()
    check_aligned(writes_seen, rep.size)
    meta = store.meta(path)
    assert not meta.dirty and meta.clean == meta.seq == rep.upto
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~perms.current_umask()   # no umask recorded: the flusher's


@pytest.mark.timeout(60)
def test_strided_unaligned_records(mem_atier, writes_seen):
    """Strided 47,008-byte records of 3 writers interleaved: identical file, bytes / WRITE_SIZE writes."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "strided.dat")
    store.create(path, None)
    model = Model()
    nproc, nrec = 3, 30
    rnd = random.Random(2)
    for rank in range(nproc):
        put(store, path, model, [((i * nproc + rank) * RECORD, rnd.randbytes(RECORD)) for i in range(nrec)], rank)
    rep = flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)
    assert rep.writes == -(-nproc * nrec * RECORD // flush.writes.WRITE_SIZE) == 1
    check_aligned(writes_seen, rep.size)


@pytest.mark.timeout(60)
def test_writes_are_batches_of_whole_stripes(mem_atier, writes_seen, small_writes):
    """With WRITE_SIZE of 4 stripes (plus change), a 64-stripe file takes 16 writes of exactly 4 stripes."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "batches.dat")
    store.create(path, None)
    model = Model()
    rnd = random.Random(3)
    put(store, path, model, [(o, rnd.randbytes(RECORD)) for o in range(0, 64 * ALIGN - RECORD, RECORD)])
    put(store, path, model, [(64 * ALIGN - 10, b"e" * 10)])
    rep = flush.sync(path, tier=mem_atier, verify=True)
    assert open(path, "rb").read() == bytes(model.data)
    assert rep.write_sizes == {small_writes: 16}
    assert sorted(off for _, off, _ in writes_seen) == list(range(0, 64 * ALIGN, small_writes))


@pytest.mark.timeout(60)
def test_n_to_n_files(mem_atier):
    """One file per writer (N-N): each flushed on its own, each identical."""
    store = mem_atier.store
    models = {}
    for rank in range(4):
        path = bfs_file(mem_atier, f"nn/out.{rank}")
        store.create(path, None)
        models[path] = Model()
        rnd = random.Random(rank)
        put(store, path, models[path], [(o, rnd.randbytes(4096)) for o in range(0, 300000, 4096)], rank)
    for path, model in models.items():
        flush.sync(path, tier=mem_atier)
        assert open(path, "rb").read() == bytes(model.data)


@pytest.mark.timeout(120)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 600_000), st.integers(1, 300_000)),
    st.tuples(st.just("t"), st.integers(0, 700_000), st.just(0)),
    st.tuples(st.just("s"), st.just(0), st.just(0))), min_size=1, max_size=12),
    initial=st.integers(0, 400_000), seed=st.integers(0, 2**32 - 1))
def test_random_writes_truncations_and_syncs(mem_atier, ops, initial, seed):
    """Random writes (overlapping, unaligned), Set_size truncations and syncs over an existing or new file."""
    rnd = random.Random(seed)
    name = f"rand/{next(_EXAMPLE)}"   # one file per example: replayed and shrunk examples repeat their arguments
    path = bfs_file(mem_atier, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = rnd.randbytes(initial) if initial else None
    if start is not None:
        with open(path, "wb") as f:
            f.write(start)
    store = mem_atier.store
    store.create(path, initial if start is not None else None)
    model = Model(start or b"")
    for op, a, b in ops:
        if op == "w":
            put(store, path, model, [(a, rnd.randbytes(b))])
        elif op == "t":
            store.set_size(path, a)
            model.truncate(a)
        else:
            flush.sync(path, tier=mem_atier)
    flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)
    assert b"".join(residency.read(path, tier=mem_atier)) == bytes(model.data)
    assert not store.meta(path).dirty
    store.drop(path)


@pytest.mark.timeout(120)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 600_000), st.integers(1, 100_000), st.just(0), st.just(0)),
    st.tuples(st.just("v"), st.integers(0, 600_000), st.integers(1, 9000), st.integers(2, 60),
              st.sampled_from([0, 1, 4096, 3 * ALIGN, 5 * ALIGN + 7])),
    st.tuples(st.just("t"), st.integers(0, 700_000), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("s"), st.just(0), st.just(0), st.just(0), st.just(0))), min_size=1, max_size=10),
    initial=st.integers(0, 400_000), seed=st.integers(0, 2**32 - 1))
def test_strided_runs_flush_byte_for_byte(mem_atier, ops, initial, seed, writes_seen):
    """Strided runs (strides below and above a stripe) among plain writes, truncations and syncs."""
    rnd = random.Random(seed)
    path = bfs_file(mem_atier, f"strided/{next(_EXAMPLE)}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = rnd.randbytes(initial) if initial else None
    if start is not None:
        with open(path, "wb") as f:
            f.write(start)
    store = mem_atier.store
    store.create(path, initial if start is not None else None)
    model = Model(start or b"")
    for op, a, b, count, gap in ops:
        if op == "w":
            put(store, path, model, [(a, rnd.randbytes(b))])
        elif op == "v":
            put_runs(store, path, model, [(a, rnd.randbytes(b * count), b, b + gap)])
        elif op == "t":
            store.set_size(path, a)
            model.truncate(a)
        else:
            flush.sync(path, tier=mem_atier)
    writes_seen.clear()
    rep = flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)
    assert not store.meta(path).dirty
    check_aligned([w for w in writes_seen if w[0] == path], rep.size)
    store.drop(path)


@pytest.mark.timeout(60)
def test_a_sparse_strided_run_writes_only_its_stripes(mem_atier, writes_seen):
    """Blocks 10 stripes apart: the flush writes the stripes holding blocks, not the gaps between them."""
    path = bfs_file(mem_atier, "sparse-strided.dat")
    store = mem_atier.store
    store.create(path, None)
    model = Model()
    put_runs(store, path, model, [(ALIGN // 2, random.Random(5).randbytes(8 * 100), 100, 10 * ALIGN)])
    put(store, path, model, [(3 * ALIGN, b"p" * 10)])           # a plain write between two blocks
    assert len(store.extents_from(path, 0, 100)) == 2              # one strided entry, one plain
    rep = flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)
    assert sorted(off // ALIGN for _, off, _ in writes_seen) == [0, 3, 10, 20, 30, 40, 50, 60, 70]
    assert rep.writes == 9


# ----------------------------------------------------------------------------- existing files, truncation

@pytest.mark.timeout(60)
def test_partial_overwrite_keeps_existing_bytes_and_writes_only_dirty_stripes(mem_atier, writes_seen):
    """Writes into an existing BFS file: untouched bytes stay, only stripes with new data are rewritten."""
    path = bfs_file(mem_atier, "existing.dat")
    original = random.Random(3).randbytes(2 << 20)
    with open(path, "wb") as f:
        f.write(original)
    store = mem_atier.store
    store.create(path, len(original))
    model = Model(original)
    put(store, path, model, [(100_000, b"a" * 5000), (1_000_000, b"b" * 70_000), (2_097_000, b"c" * 10_000)])
    rep = flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)
    # the stripes holding the three writes, nothing else; adjacent dirty stripes share one write
    assert sorted((off // ALIGN, n) for _, off, n in writes_seen) == [(1, ALIGN), (15, 2 * ALIGN),
                                                                      (31, rep.size - 31 * ALIGN)]
    check_aligned(writes_seen, rep.size)


@pytest.mark.timeout(60)
def test_truncation_of_existing_file_then_regrowth(mem_atier):
    """Set_size shrinks an existing file; later writes past the cut leave zeros in between, not old bytes."""
    path = bfs_file(mem_atier, "trunc.dat")
    original = random.Random(4).randbytes(1 << 20)
    with open(path, "wb") as f:
        f.write(original)
    store = mem_atier.store
    store.create(path, len(original))
    model = Model(original)
    store.set_size(path, 300_000)
    model.truncate(300_000)
    put(store, path, model, [(500_000, b"z" * 1000)])
    assert store.meta(path).trunc == 300_000
    flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)
    assert store.meta(path).trunc is None
    store.set_size(path, 100)
    model.truncate(100)
    flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(model.data)


@pytest.mark.timeout(60)
def test_nothing_dirty_writes_nothing(mem_atier, writes_seen):
    store = mem_atier.store
    path = bfs_file(mem_atier, "twice.dat")
    store.create(path, None)
    put(store, path, None, [(0, b"x" * 300_000)])
    flush.sync(path, tier=mem_atier)
    writes_seen.clear()
    rep = flush.sync(path, tier=mem_atier)
    assert rep.writes == 0 and writes_seen == []


# ----------------------------------------------------------------------------- durability rules

@pytest.mark.timeout(60)
def test_new_file_appears_only_complete(mem_atier, writes_seen):
    """While a new file is being written, its final name does not exist; a temp file beside it does."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "deep/new/dir/file.dat")    # missing parents are created
    store.create(path, None)
    put(store, path, None, [(0, b"q" * 500_000)])
    states = []
    flush.writes.write_observers.append(lambda p, o, n: states.append(
        (os.path.exists(path), [n for n in os.listdir(os.path.dirname(path)) if ".mpiburst-" in n])))
    flush.sync(path, tier=mem_atier)
    assert states and all(not exists and len(temps) == 1 for exists, temps in states)
    assert os.listdir(os.path.dirname(path)) == ["file.dat"]


@pytest.mark.timeout(60)
def test_writes_during_flush_stay_dirty(mem_atier):
    """A write that arrives while a flush runs is not in its snapshot: still dirty, flushed next time."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "concurrent.dat")
    store.create(path, None)
    model = Model()
    put(store, path, model, [(0, b"1" * 400_000)])
    late = Model(bytes(model.data))
    once = []

    def write_now(p, o, n):
        if not once:
            once.append(1)
            put(store, path, late, [(10, b"2" * 100)])

    flush.writes.write_observers.append(write_now)
    flush.sync(path, tier=mem_atier)
    flush.writes.write_observers.clear()
    assert open(path, "rb").read() == bytes(model.data)
    assert store.meta(path).dirty
    assert residency.frag_stat(path, tier=mem_atier).dirty == 100
    flush.sync(path, tier=mem_atier)
    assert open(path, "rb").read() == bytes(late.data)


@pytest.mark.timeout(60)
def test_memory_per_flusher_is_bounded(mem_atier, small_writes):
    """Flushing 16 MiB allocates a few WRITE_SIZE batches' worth of memory, not the file."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "big.dat")
    store.create(path, None)
    rnd = random.Random(5)
    for base in range(0, 16 << 20, 4 << 20):
        put(store, path, None, [(base + o, rnd.randbytes(32768)) for o in range(0, 4 << 20, 32768)])
    tracemalloc.start()
    try:
        flush.sync(path, tier=mem_atier)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(path) == 16 << 20
    assert peak < 3 * small_writes + (1 << 20), peak   # two batch buffers and one scratch for small pieces


@pytest.mark.timeout(60)
def test_bfs_write_calls_seen_by_strace(atier, tmp_path):
    """strace confirms the flush's pwrite64 calls are aligned 4-stripe batches (3000 fragments, 12 calls)."""
    strace = require_tool("strace")
    store = atier.store
    path = bfs_file(atier, "traced.dat")
    store.create(path, None)
    rnd = random.Random(6)
    size = 3000 * 1000
    put(store, path, None, [(o, rnd.randbytes(1000)) for o in rnd.sample(range(0, size, 1000), 3000)])
    log = tmp_path / "strace.log"
    code = ("import sys; from mpiburst import flush; from mpiburst.tier import Tier; "
            f"flush.writes.WRITE_SIZE = {4 * ALIGN}; flush.sync(sys.argv[1], tier=Tier.connect(conf=sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([strace, "-f", "-qq", "-e", "trace=pwrite64", "-o", str(log), sys.executable, "-c", code,
                    path, atier.conf.path], check=True, env=env, timeout=60)
    calls = [line for line in log.read_text().splitlines() if "pwrite64(" in line]
    offsets = [int(line.rsplit(",", 1)[1].split(")")[0]) for line in calls]
    assert len(calls) == -(-size // (4 * ALIGN)) == 12
    assert sorted(offsets) == list(range(0, size, 4 * ALIGN))


# ----------------------------------------------------------------------------- API edges

@pytest.mark.timeout(30)
def test_bad_paths_and_non_blocking(mem_atier, tmp_path):
    with pytest.raises(PathError, match="not in the tier"):
        flush.sync(bfs_file(mem_atier, "never-written"), tier=mem_atier)
    with pytest.raises(PathError, match="outside the run's BFS root"):
        flush.sync(str(tmp_path / "elsewhere"), tier=mem_atier)
    store = mem_atier.store
    path = bfs_file(mem_atier, "queued.dat")
    store.create(path, None)
    assert flush.sync("burst://queued.dat", tier=mem_atier, block=False) is None
    assert mem_atier.store.queued() == 1
    assert store.meta(path).dirty and not os.path.exists(path)  # only queued: the new file is not made yet


@pytest.mark.timeout(60)
def test_reads_after_flush_see_newest_bytes(mem_atier):
    """After a flush and a purge of clean data, reads take the tier's newer bytes and the BFS for the rest."""
    store = mem_atier.store
    path = bfs_file(mem_atier, "reads.dat")
    store.create(path, None)
    model = Model()
    put(store, path, model, [(0, random.Random(7).randbytes(700_000))])
    flush.sync(path, tier=mem_atier)
    assert residency.purge(path, clean_only=True, tier=mem_atier) > 0
    put(store, path, model, [(123_456, b"new" * 1000)])
    assert b"".join(residency.read(path, tier=mem_atier)) == bytes(model.data)


@pytest.mark.timeout(60)
def test_workers_split_the_stripes(mem_atier, writes_seen):
    store = mem_atier.store
    path = bfs_file(mem_atier, "workers.dat")
    store.create(path, None)
    model = Model()
    put(store, path, model, [(0, random.Random(8).randbytes(1_500_000))])
    rep = flush.sync(path, tier=mem_atier, workers=3)
    assert open(path, "rb").read() == bytes(model.data)
    assert rep.writes == 3                                  # 23 stripes: 7 + 8 + 8, one write per worker
    check_aligned(writes_seen, rep.size)
