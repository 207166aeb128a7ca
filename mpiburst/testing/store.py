"""The store contract suite: every behaviour of :class:`mpiburst.store.Store`, for any implementation.

Subclass :class:`StoreTests` in a test module and give it a ``store`` fixture
that yields an empty store, and a ``reopen`` fixture that gives a function
returning a new handle on the same data (after ``store.close()``)::

    class TestMemoryStore(StoreTests):
        @pytest.fixture
        def store(self):
            yield MemoryStore()

        @pytest.fixture
        def reopen(self, store):
            return lambda: store      # its data lives in the object

The data tests compare what the store returns with a :class:`~mpiburst.testing.Model`
(a ``bytearray`` image of the file) under random batches, overlaps,
truncations and windows (hypothesis). A new store (a cluster store, say)
is correct when it passes this suite unchanged.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..errors import TierFullError
from ..overlay import Strided, expand, gaps
from ..store import MAX_EXTENT, FileMeta, FlushLease, MemoryStore, NewFile, Placement, RecordGone, Store, file_id
from . import Model, put, put_runs

#: Hypothesis settings of the data tests: few examples, each on a fresh file of the same store
#: (every subclass runs them on its own store, hence ``differing_executors``).
_EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.differing_executors])

_write = st.tuples(st.integers(0, 600_000), st.integers(1, 300_000))
_batch = st.lists(_write, min_size=1, max_size=4)
#: A write of a batch with strided runs: plain ``(offset, n)`` or strided ``(offset, length, count, gap)``.
_run = st.one_of(st.tuples(st.integers(0, 300_000), st.integers(1, 70_000)),
                 st.tuples(st.integers(0, 300_000), st.integers(1, 5_000), st.integers(2, 40), st.integers(0, 9_000)))
_run_batch = st.lists(_run, min_size=1, max_size=4)


def _path() -> str:
    """A fresh absolute path (each hypothesis example gets a file of its own)."""
    return f"/bfs/contract/{random.getrandbits(64):016x}.dat"


def must(meta: FileMeta | None) -> FileMeta:
    """Return ``meta``, failing the test where a store call returned no record."""
    assert meta is not None, "the store returned no record"
    return meta


def record(store: Store, path: str) -> FileMeta:
    """Return ``path``'s record, failing the test where the tier has none."""
    meta = store.meta(path)
    assert meta is not None, f"the tier has no record of {path}"
    return meta


def must_take(taken: tuple[str, FileMeta] | None) -> tuple[str, FileMeta]:
    """Return a lease and snapshot :meth:`Store.lease_and_begin` took, failing the test where it took none."""
    assert taken is not None, "the flush lease was held"
    return taken


def lease_of(store: Store, path: str, ttl: float) -> FlushLease:
    """Return ``path``'s flush lease, failing the test where another holder has it."""
    lease = store.flush_lease(path, ttl)
    assert lease is not None, f"the flush lease of {path} is held"
    return lease


def current(store: Store, path: str, lo: int, hi: int) -> bytes:
    """Return the tier's bytes of ``[lo, hi)`` of ``path`` as a read sees them, zeros where no extent is."""
    meta, found = store.window(path, lo, hi)
    out = memoryview(bytearray(hi - lo))
    assert store.fetch_into(path, found, lo, out)
    for a, b in gaps(lo, hi, found):
        assert out[a - lo:b - lo] == bytes(b - a)        # fetch_into leaves uncovered bytes alone
    return bytes(out)


def current_compact(store: Store, path: str, lo: int, hi: int, upto: int | None = None) -> bytes:
    """Return the bytes of ``[lo, hi)`` assembled from the compact index, as a flush batch does."""
    found = store.index(path, lo, hi, upto=upto)
    assert [e.start for e in found] == sorted(e.start for e in found)
    out = memoryview(bytearray(hi - lo))
    assert store.fetch_into(path, found, lo, out)
    for a, b in gaps(lo, hi, found):
        assert out[a - lo:b - lo] == bytes(b - a)
    return bytes(out)


def _blobless(entries: list) -> list:
    """Return ``entries`` with their blob ids zeroed (a cluster store numbers blobs its own way)."""
    return [e._replace(blob=0) for e in entries]


def _strided_writes(rnd: random.Random, batch: list[tuple]) -> list[tuple]:
    """Turn drawn ``_run`` tuples into :func:`~mpiburst.testing.put_runs` writes with random bytes."""
    out: list[tuple] = []
    for w in batch:
        if len(w) == 2:
            out.append((w[0], rnd.randbytes(w[1])))
        else:
            off, length, count, gap = w
            out.append((off, rnd.randbytes(length * count), length, length + gap))
    return out


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class StoreTests:
    """Every behaviour of the store interface; subclasses provide the ``store`` fixture (an empty store)."""

    #: Whether the store spreads its data over the servers of several nodes, so that it gives a
    #: :attr:`~mpiburst.store.Store.placement` (a subclass for such a store sets it True).
    placed = False

    # -- file records -------------------------------------------------------
    def test_create_meta_files_drop(self, store: Store) -> None:
        assert store.empty() and store.files() == {} and store.meta("/bfs/a") is None
        meta = store.create("/bfs/a", None)
        assert meta == FileMeta(path="/bfs/a", size=0, seq=0, clean=0, pending=0, trunc=None, pinned=False,
                                bfs=False)
        assert store.meta("/bfs/a") == meta and meta.dirty and not store.empty()   # the BFS lacks the new file
        on_bfs = store.create("/bfs/b", 1234)
        assert on_bfs.size == 1234 and on_bfs.bfs and not on_bfs.dirty
        assert store.files() == {"/bfs/a": file_id("/bfs/a"), "/bfs/b": file_id("/bfs/b")}
        store.drop("/bfs/a")
        assert store.meta("/bfs/a") is None and set(store.files()) == {"/bfs/b"}
        store.drop("/bfs/nothing")                           # dropping an unknown file is no error

    def test_create_keeps_an_existing_record(self, store: Store) -> None:
        store.create("/bfs/a", 10)
        put(store, "/bfs/a", None, [(0, b"x" * 100)])
        again = store.create("/bfs/a", 5)
        assert again.size == 100 and again.seq == 1 and again.bfs

    def test_a_record_made_unlooked_takes_the_bfs_size_once(self, store: Store) -> None:
        made = store.create("/bfs/u", 999, looked=False, writing=True)
        assert made.unlooked and (made.size, made.bfs, made.writers) == (0, False, 1)   # bfs_size ignored
        put(store, "/bfs/u", None, [(0, b"x" * 100)])
        assert record(store, "/bfs/u").unlooked and store.cut()["/bfs/u"].unlooked
        found = must(store.found_on_bfs("/bfs/u", 4096))
        assert not found.unlooked and (found.size, found.bfs, found.seq) == (4096, True, 1)
        assert store.found_on_bfs("/bfs/u", 10) == found == store.meta("/bfs/u")   # only the first call counts
        assert store.create("/bfs/u", None, looked=False) == found   # an existing record is kept
        store.create("/bfs/v", None, looked=False)
        put(store, "/bfs/v", None, [(0, b"y" * 300)])
        assert must(store.found_on_bfs("/bfs/v", 200)).size == 300 and store.found_on_bfs("/bfs/w", 1) is None
        store.create("/bfs/n", None, looked=False)
        nothing = must(store.found_on_bfs("/bfs/n", None))
        assert (nothing.unlooked, nothing.bfs, nothing.size) == (False, False, 0)
        looked = store.create("/bfs/l", 50)
        assert store.found_on_bfs("/bfs/l", 80) == looked   # a looked record is kept as it is

    def test_drop_removes_every_key_of_the_file_and_nothing_else(self, store: Store) -> None:
        for path in ("/bfs/d", "/bfs/k"):
            store.create(path, None)
            put(store, path, None, [(0, b"a" * 10), (5, b"b" * 10)])   # two batches
            store.shared_pointer(path, "open1", 5)
        store.commit("/bfs/d", 0, b"s" * 4, [(100, 0, 4)], staged=True)
        store.set_shared_pointer("/bfs/d", "open2", 9)
        lease_of(store, "/bfs/d", 30).begin()
        store.drop("/bfs/d")
        assert store.meta("/bfs/d") is None and set(store.files()) == {"/bfs/k"}
        assert current(store, "/bfs/k", 0, 15) == b"a" * 5 + b"b" * 10 and store.shared_pointer("/bfs/k", "open1") == 5
        store.drop_shared_pointer("/bfs/k", "open1")
        store.drop("/bfs/k")
        assert store.empty()   # no batch, staged blob, index, pointer or lease of either left

    def test_pin_and_unpin(self, store: Store) -> None:
        store.create("/bfs/p", None)
        store.set_pinned("/bfs/p", True)
        assert record(store, "/bfs/p").pinned
        store.set_pinned("/bfs/p", False)
        assert not record(store, "/bfs/p").pinned

    # -- data ---------------------------------------------------------------
    def test_sequence_numbers_follow_arrival(self, store: Store) -> None:
        store.create("/bfs/s", None)
        assert put(store, "/bfs/s", None, [(0, b"a"), (10, b"b"), (20, b"c")]) == 1
        assert put(store, "/bfs/s", None, [(0, b"d")]) == 4
        meta = record(store, "/bfs/s")
        assert meta.seq == 4 and meta.size == 21 and meta.dirty
        assert [e.seq for e in store.all_extents("/bfs/s")] == [1, 4, 2, 3]     # offset order, then seq
        assert current(store, "/bfs/s", 0, 21) == b"d" + bytes(9) + b"b" + bytes(9) + b"c"

    def test_commit_without_a_record_is_refused(self, store: Store) -> None:
        with pytest.raises(RecordGone):
            put(store, "/bfs/none", None, [(0, b"x")])
        assert store.meta("/bfs/none") is None and store.blobs("/bfs/none") == []

    @_EXAMPLES
    @given(batches=st.lists(_batch, min_size=1, max_size=5), window=_write)
    def test_reads_match_the_model(self, store: Store, batches: list, window: tuple[int, int]) -> None:
        """Random batches with overlaps; every window reads what the model holds."""
        path = _path()
        store.create(path, None)
        model = Model()
        rnd = random.Random(len(batches))
        for batch in batches:
            put(store, path, model, [(off, rnd.randbytes(n)) for off, n in batch], channel=rnd.randrange(4))
        assert record(store, path).size == len(model.data)
        lo, n = window
        assert current(store, path, lo, lo + n) == bytes(model.data[lo:lo + n].ljust(n, b"\0"))
        size = len(model.data)
        assert current(store, path, 0, size) == bytes(model.data)
        store.drop(path)

    @_EXAMPLES
    @given(batches=st.lists(_batch, min_size=1, max_size=4), window=_write, upto=st.integers(0, 30))
    def test_extent_queries(self, store: Store, batches: list, window: tuple[int, int], upto: int) -> None:
        """extents / window / all_extents agree, in offset order, and find exactly the overlapping extents."""
        path = _path()
        store.create(path, None)
        rnd = random.Random(upto)
        for batch in batches:
            put(store, path, None, [(off, rnd.randbytes(n)) for off, n in batch])
        every = list(store.all_extents(path))
        assert [e.start for e in every] == sorted(e.start for e in every)
        assert all(0 < e.length <= MAX_EXTENT for e in every)
        lo, hi = window[0], window[0] + window[1]
        overlapping = [e for e in every if e.start < hi and e.end > lo]
        assert sorted(store.extents(path, lo, hi)) == sorted(overlapping)
        assert [e.start for e in store.extents(path, lo, hi)] == sorted(e.start for e in overlapping)
        assert sorted(store.extents(path, lo, hi, upto=upto)) == sorted(e for e in overlapping if e.seq <= upto)
        meta, found = store.window(path, lo, hi)
        assert meta == store.meta(path) and sorted(found) == sorted(overlapping)
        store.drop(path)

    # -- strided runs (the compact index of regular views) -----------------
    @_EXAMPLES
    @given(batches=st.lists(_run_batch, min_size=1, max_size=5), window=_write)
    def test_strided_runs_read_as_their_blocks(self, store: Store, batches: list, window: tuple[int, int]) -> None:
        """Strided runs and plain writes in any order and overlap: reads, the compact index and the model agree."""
        path = _path()
        store.create(path, None)
        model = Model()
        rnd = random.Random(len(batches))
        for batch in batches:
            put_runs(store, path, model, _strided_writes(rnd, batch), channel=rnd.randrange(4))
        size = len(model.data)
        assert record(store, path).size == size
        lo, n = window
        want = bytes(model.data[lo:lo + n].ljust(n, b"\0"))
        assert current(store, path, lo, lo + n) == want
        assert current_compact(store, path, lo, lo + n) == want
        assert current(store, path, 0, size) == bytes(model.data) == current_compact(store, path, 0, size)
        every = list(store.all_extents(path))                # expanded: plain extents, in offset order
        assert all(not isinstance(e, Strided) for e in every)
        assert [e.start for e in every] == sorted(e.start for e in every)
        overlapping = [e for e in every if e.start < lo + n and e.end > lo]
        assert sorted(store.extents(path, lo, lo + n)) == sorted(overlapping)
        assert sorted(expand(store.index(path, lo, lo + n), lo, lo + n)) == sorted(overlapping)
        store.drop(path)

    def test_a_strided_run_is_one_index_entry(self, store: Store) -> None:
        """4096 blocks of 4 KiB, 8 KiB apart: one entry, one sequence number; later writes win where they land."""
        path = "/bfs/vec"
        store.create(path, None)
        model = Model()
        block, count, stride = 4096, 4096, 8192
        data = random.Random(1).randbytes(block * count)
        assert put_runs(store, path, model, [(0, data, block, stride)]) == 1
        meta = record(store, path)
        assert meta.seq == 1 and meta.size == (count - 1) * stride + block
        run = Strided(1, 0, block, 0, 0, count, stride)                  # blob ids are the store's own
        assert _blobless(store.extents_from(path, 0, 10)) == [run]
        assert _blobless(store.index(path, 100_000, 100_001)) == [run]
        assert [e.start for e in store.extents(path, 4000, 20_000)] == [0, 8192, 16384]
        # a later contiguous write across three blocks and a gap, and another strided run shifted by half a block
        put_runs(store, path, model, [(10_000, b"C" * 10_000)])
        put_runs(store, path, model, [(2048 + 40 * stride, b"S" * (block * 30), block, stride)])
        for lo, hi in [(0, meta.size), (9_000, 25_000), (40 * stride, 75 * stride + 1), (meta.size - 5000, meta.size)]:
            want = bytes(model.data[lo:hi])
            assert current(store, path, lo, hi) == want == current_compact(store, path, lo, hi)
        assert current_compact(store, path, 0, meta.size, upto=1) == data_of_first(data, block, stride, meta.size)
        assert len(store.blobs(path)) == 3 and record(store, path).seq == 3

    def test_truncation_cuts_a_strided_run(self, store: Store) -> None:
        """set_size keeps the whole blocks below the cut, a partial block, and nothing past it."""
        for size in (0, 1, 100, 4096, 4097, 8192, 8193, 12_000, 3 * 8192 + 100, 10 * 8192):
            path = f"/bfs/trunc-{size}"
            store.create(path, None)
            model = Model()
            put_runs(store, path, model, [(0, bytes(range(256)) * 16 * 8, 4096, 8192)])
            store.set_size(path, size)
            model.truncate(size)
            assert all(e.end <= size for e in store.all_extents(path))
            assert current(store, path, 0, size) == bytes(model.data) == current_compact(store, path, 0, size)
            store.drop(path)

    def test_drop_clean_frees_strided_runs(self, store: Store) -> None:
        store.create("/bfs/dcs", None)
        put_runs(store, "/bfs/dcs", None, [(0, b"a" * 8000, 1000, 3000)])
        put_runs(store, "/bfs/dcs", None, [(500, b"b" * 4000, 500, 2000)])
        with lease_of(store, "/bfs/dcs", 30) as lease:
            assert lease.mark_clean(1, None)
        assert store.drop_clean("/bfs/dcs") == 8000
        assert _blobless(store.extents_from("/bfs/dcs", 0, 10)) == [Strided(2, 500, 500, 0, 0, 8, 2000)]
        assert [b.last for b in store.blobs("/bfs/dcs")] == [2]

    def test_extents_from_walks_the_index_by_offset(self, store: Store) -> None:
        """extents_from pages through the index by offset: a page ends where the next one starts."""
        store.create("/bfs/walk", None)
        starts = [0, 5, 5, 700_000, 2**52]
        for off in starts:
            put(store, "/bfs/walk", None, [(off, b"x" * 3)])
        every = list(store.all_extents("/bfs/walk"))
        assert [e.start for e in store.extents_from("/bfs/walk", 0, 100)] == starts
        assert store.extents_from("/bfs/walk", 1, 2) == every[1:3]
        assert store.extents_from("/bfs/walk", 6, 1) == every[3:4]
        assert store.extents_from("/bfs/walk", 2**52 + 1, 10) == []
        assert store.extents_from("/bfs/none", 0, 10) == []

    def test_walk_yields_every_entry_of_a_range(self, store: Store) -> None:
        """walk pages through the index by offset: more entries at one offset than a page, a strided run, an
        extent reaching into the range from before it; each entry of [lo, hi) comes at least once, none outside."""
        path = "/bfs/walk2"
        store.create(path, None)
        for _ in range(5):
            put(store, path, None, [(1000, b"s" * 10)])        # five entries at one offset, pages of two
        put(store, path, None, [(500, b"r" * 600), (50_000, b"z")])   # [500, 1100) reaches into lo=900
        put_runs(store, path, None, [(2000, b"q" * 40, 4, 100)])       # a strided run of 10 blocks
        lo, hi = 900, 50_000
        want = {e for e in store.index(path, lo, hi) if e.start < hi}
        walked = list(store.walk(path, lo, hi, page=2))
        assert set(walked) == want and len(want) == 7
        assert [e.start for e in walked] == sorted(e.start for e in walked)
        assert {e.start for e in store.walk(path)} == {500, 1000, 2000, 50_000}   # the whole file by default

    def test_placement_says_where_the_data_lies(self, store: Store) -> None:
        """One server (or this process): no placement. Several nodes: each file's index is the union of what
        its holders hold, and a file never written has no holder."""
        place = store.placement
        if not self.placed:
            assert place is None
            return
        assert isinstance(place, Placement) and place.nodes >= 2
        path = "/bfs/placed"
        store.create(path, None)
        put(store, path, None, [(0, b"a" * 5000), (9000, b"b" * 7)])
        put_runs(store, path, None, [(20_000, b"c" * 30, 3, 50)])
        holders = place.holders(path)
        assert holders and holders == sorted(set(holders)) and set(holders) <= set(range(place.nodes))
        held = [e for node in holders for e in place.node_index(path, node)]
        assert sorted((e.start, e.length, e.seq) for e in held) == sorted(
            (e.start, e.length, e.seq) for e in store.index(path, 0, 1 << 40))
        store.create("/bfs/unwritten", None)
        assert place.holders("/bfs/unwritten") == [] and place.holders("/bfs/none") == []

    def test_confirm_returns_with_the_writes_in_place(self, store: Store) -> None:
        """confirm (what Sync and Close call) returns within its bound, before and after writes, and changes
        no byte: on a store without replicas it has nothing to wait for; with replicas it waits for them."""
        store.confirm(timeout=5.0)
        path = "/bfs/confirmed"
        store.create(path, None)
        put(store, path, None, [(0, b"x" * 3000), (5000, b"y" * 10)])
        before = store.window(path, 0, 6000)
        store.confirm(timeout=5.0)
        assert store.window(path, 0, 6000) == before

    def test_cut_reads_every_record(self, store: Store) -> None:
        """cut returns every file's record (as meta does, without pending), one entry per file."""
        assert store.cut() == {}
        store.create("/bfs/c1", None)
        store.create("/bfs/c2", 7, umask=0o022)
        put(store, "/bfs/c1", None, [(0, b"abc"), (10, b"d")])
        with lease_of(store, "/bfs/c1", 30) as lease:
            lease.begin()                                     # pending is set in the record, not in the cut
            cut = store.cut()
            lease.release()
        assert set(cut) == {"/bfs/c1", "/bfs/c2"}
        assert cut["/bfs/c1"].seq == 2 and cut["/bfs/c1"].size == 11 and cut["/bfs/c1"].pending == 0
        assert cut["/bfs/c2"] == store.meta("/bfs/c2")
        store.drop("/bfs/c2")
        assert set(store.cut()) == {"/bfs/c1"}

    def test_writers_are_counted_and_settle_the_consistent_mark(self, store: Store) -> None:
        """writers counts open writing handles; the settled mark is taken only when the change allows it."""
        path = "/bfs/w"
        assert store.writers(path, 1, 1) == -1 and store.meta(path) is None     # no record: nothing made
        store.create(path, None)
        put(store, path, None, [(0, b"closed")])                 # seq 1, size 6: the state before the open
        assert store.writers(path, 1, 1) == 1                    # first writer: settles at seq 1
        put(store, path, None, [(6, b"half")])                   # seq 2, size 10
        meta = record(store, path)
        assert (meta.writers, meta.settled, meta.settled_size, meta.settled_truncs) == (1, 1, 6, 0)
        assert store.cut()[path].settled_state() == replace(meta, seq=1, size=6, writers=0)
        assert store.writers(path, 1, 1) == 2                    # a second writer: no settle
        assert store.writers(path, 0, 1) == 2 and record(store, path).settled == 1   # a Sync of one of two
        assert store.writers(path, -1) == 1
        assert store.writers(path, 0, 1) == 1                    # the only writer's Sync settles
        assert (record(store, path).settled, record(store, path).settled_size) == (2, 10)
        store.set_size(path, 4)                                  # truncated after the mark: it is lost
        assert record(store, path).truncs == 1 and record(store, path).settled_state() is None
        kept = replace(record(store, path), clean=2).settled_state()               # unless the BFS has it
        assert kept is not None and kept.dirty is False
        assert store.writers(path, 0, 1 << 30) == 1              # settle whatever the count
        settled = record(store, path).settled_state()
        assert settled is not None
        assert (settled.seq, settled.size, settled.trunc) == (2, 4, 4)
        assert store.writers(path, -1) == 0 and store.writers(path, -1) == 0   # never below zero
        done = record(store, path)
        assert done.settled_state() == done and done.writers == 0

    def test_a_create_for_writing_counts_the_writer_in_the_same_call(self, store: Store) -> None:
        """create(writing=True) is create, then writers(path, 1, 1), as one step: an open for writing's one call."""
        meta = store.create("/bfs/cw", 5, writing=True)
        assert (meta.writers, meta.settled, meta.settled_size, meta.size) == (1, 0, 5, 5)
        assert record(store, "/bfs/cw") == meta
        put(store, "/bfs/cw", None, [(0, b"ab")])                # seq 1
        again = store.create("/bfs/cw", None, writing=True)      # the record kept; a second writer: no settle
        assert (again.writers, again.settled, again.seq, again.size) == (2, 0, 1, 5)
        assert store.writers("/bfs/cw", -1) == 1 and store.writers("/bfs/cw", -1) == 0
        assert store.create("/bfs/cw", None).writers == 0        # without writing: no count

    def test_window_of_an_unknown_file(self, store: Store) -> None:
        assert store.window("/bfs/unknown", 0, 100) == (None, [])
        assert store.extents("/bfs/unknown", 0, 100) == [] and list(store.all_extents("/bfs/unknown")) == []

    @_EXAMPLES
    @given(batches=st.lists(_batch, min_size=1, max_size=3), size=st.integers(0, 900_000), window=_write)
    def test_set_size_clips_and_records_the_truncation(self, store: Store, batches: list, size: int,
                                                       window: tuple[int, int]) -> None:
        path = _path()
        store.create(path, None)
        model = Model()
        rnd = random.Random(size)
        for batch in batches:
            put(store, path, model, [(off, rnd.randbytes(n)) for off, n in batch])
        old = len(model.data)
        assert store.set_size(path, size) == old
        model.truncate(size)
        meta = record(store, path)
        assert meta.size == size and meta.trunc == min(old, size) and meta.dirty
        assert all(e.end <= size for e in store.all_extents(path))
        lo, n = window
        assert current(store, path, lo, lo + n) == bytes(model.data[lo:lo + n].ljust(n, b"\0"))
        store.drop(path)

    def test_a_later_truncation_keeps_the_lowest_cut(self, store: Store) -> None:
        store.create("/bfs/t", 1000)
        store.set_size("/bfs/t", 100)
        store.set_size("/bfs/t", 500)
        meta = record(store, "/bfs/t")
        assert meta.size == 500 and meta.trunc == 100

    def test_staged_data_is_clean_and_older_than_writes(self, store: Store) -> None:
        store.create("/bfs/st", 300)
        put(store, "/bfs/st", None, [(100, b"W" * 50)])
        assert store.commit("/bfs/st", 0, b"S" * 300, [(0, 0, 300)], staged=True) == 0
        meta = record(store, "/bfs/st")
        assert meta.seq == 1 and meta.size == 300
        assert current(store, "/bfs/st", 0, 300) == b"S" * 100 + b"W" * 50 + b"S" * 150
        assert [b.last for b in store.blobs("/bfs/st", 0, 0)] == [0]
        assert {e.seq for e in store.all_extents("/bfs/st")} == {0, 1}

    def test_blobs_record_each_batch(self, store: Store) -> None:
        store.create("/bfs/bl", None)
        put(store, "/bfs/bl", None, [(0, b"a" * 10), (50, b"b" * 5)], channel=2)
        put(store, "/bfs/bl", None, [(0, b"c" * 7)], channel=3)
        blobs = store.blobs("/bfs/bl")
        assert [(b.last, b.extents, b.bytes, b.channel) for b in blobs] == [(2, 2, 15, 2), (3, 1, 7, 3)]
        assert [b.last for b in store.blobs("/bfs/bl", 3)] == [3]
        assert [b.last for b in store.blobs("/bfs/bl", 0, 2)] == [2]

    def test_pipelined_writer(self, store: Store) -> None:
        store.create("/bfs/w", None)
        writer = store.writer()
        try:
            writer.send("/bfs/w", 1, memoryview(b"hello"), [(0, 0, 5)])
            assert writer.finish() == 1
            writer.send("/bfs/w", 1, bytearray(b"J"), [(0, 0, 1)])
            assert writer.finish() == 2
            writer.send("/bfs/none", 1, b"x", [(0, 0, 1)])
            with pytest.raises(RecordGone):
                writer.finish()
            writer.send("/bfs/w", 1, b"!", [(5, 0, 1)])         # still usable after a refused batch
            assert writer.finish() == 3
        finally:
            writer.close()
        assert current(store, "/bfs/w", 0, 6) == b"Jello!"

    def test_a_closing_batch_counts_its_writer_out_once_stored(self, store: Store) -> None:
        """send(closing=True): stored, then one writer less (a Close's one round trip); not stored, no change."""
        store.create("/bfs/wc", None, writing=True)
        store.create("/bfs/wc", None, writing=True)              # two writing handles
        writer = store.writer()
        try:
            writer.send("/bfs/wc", 1, b"last", [(0, 0, 4)], closing=True)
            assert writer.finish() == 1
            assert record(store, "/bfs/wc").writers == 1
            writer.send("/bfs/gone", 1, b"x", [(0, 0, 1)], closing=True)
            with pytest.raises(RecordGone):                       # no record: nothing stored, nothing made
                writer.finish()
            assert store.meta("/bfs/gone") is None
            writer.send("/bfs/wc", 1, b"!", [(4, 0, 1)], closing=True)
            writer.finish()
            writer.send("/bfs/wc", 1, b"?", [(5, 0, 1)], closing=True)   # never below zero
            writer.finish()
        finally:
            writer.close()
        assert record(store, "/bfs/wc").writers == 0
        assert current(store, "/bfs/wc", 0, 6) == b"last!?"

    def test_a_batch_with_a_new_record_makes_it_first_in_its_round_trip(self, store: Store) -> None:
        """send(new=NewFile): the record made unless it exists (unlooked, the umask, the writer counted in), then
        the batch; a closing one counts the writer out again. ``made`` says so."""
        writer = store.writer()
        try:
            writer.send("/bfs/nw", 1, b"new", [(0, 0, 3)], closing=True, new=NewFile(0o027))
            assert writer.finish() == 1 and writer.made
            meta = record(store, "/bfs/nw")
            assert (meta.size, meta.writers, meta.unlooked, meta.umask) == (3, 0, True, 0o027)
            writer.send("/bfs/nw2", 1, b"ab", [(0, 0, 2)], new=NewFile(None))   # not closing: still counted
            writer.finish()
            assert writer.made
            assert record(store, "/bfs/nw2").writers == 1
            store.create("/bfs/old", 100, umask=0o077, writing=True)
            writer.send("/bfs/old", 1, b"x", [(0, 0, 1)], closing=True, new=NewFile(0o022))   # kept as it was
            writer.finish()
        finally:
            writer.close()
        meta = record(store, "/bfs/old")
        assert (meta.size, meta.writers, meta.unlooked, meta.bfs, meta.umask) == (100, 1, False, True, 0o077)
        assert current(store, "/bfs/nw", 0, 3) == b"new" and "/bfs/nw" in store.files()

    def test_drop_clean_frees_only_clean_batches(self, store: Store) -> None:
        store.create("/bfs/dc", None)
        put(store, "/bfs/dc", None, [(0, b"a" * 1000)])
        put(store, "/bfs/dc", None, [(500, b"b" * 1000)])
        assert store.drop_clean("/bfs/dc") == 0                # nothing clean yet
        lease = store.flush_lease("/bfs/dc", 30)
        assert lease is not None and lease.begin().pending == 2
        put(store, "/bfs/dc", None, [(2000, b"c" * 10)])         # arrives during the flush: stays dirty
        assert lease.mark_clean(1, None)
        assert store.drop_clean("/bfs/dc") == 1000
        assert sorted(e.seq for e in store.all_extents("/bfs/dc")) == [2, 3]
        assert [b.last for b in store.blobs("/bfs/dc")] == [2, 3]
        assert current(store, "/bfs/dc", 500, 1500) == b"b" * 1000
        meta = store.meta("/bfs/dc")
        assert meta is not None and meta.clean == 1 and meta.dirty
        assert store.drop_clean("/bfs/none") == 0

    def test_fetch_reports_vanished_bytes(self, store: Store) -> None:
        store.create("/bfs/v", None)
        put(store, "/bfs/v", None, [(0, b"a" * 1000), (5000, b"b" * 100_000)])
        found = store.extents("/bfs/v", 0, 200_000)
        lease = store.flush_lease("/bfs/v", 30)
        assert lease is not None and lease.mark_clean(record(store, "/bfs/v").seq, None)
        assert store.drop_clean("/bfs/v") == 101_000          # what a purge does
        out = memoryview(bytearray(200_000))
        assert store.fetch_into("/bfs/v", found, 0, out) is False
        assert store.fetch_into("/bfs/v", [], 0, out) is True  # the store is still usable

    # -- the flush lease ----------------------------------------------------
    def test_the_lease_has_one_holder(self, store: Store) -> None:
        store.create("/bfs/l", None)
        put(store, "/bfs/l", None, [(0, b"x" * 10)])
        assert not store.leased("/bfs/l")
        token = store.lease("/bfs/l", 30)
        assert token and store.leased("/bfs/l") and store.lease("/bfs/l", 30) is None
        assert store.renew("/bfs/l", token, 30) and not store.renew("/bfs/l", "not-the-token", 30)
        assert not store.mark_clean("/bfs/l", "not-the-token", 1, None)
        store.release("/bfs/l", "not-the-token")              # not the holder: nothing happens
        assert store.leased("/bfs/l")
        store.release("/bfs/l", token)
        assert not store.leased("/bfs/l") and not store.renew("/bfs/l", token, 30)
        assert not store.mark_clean("/bfs/l", token, 1, None)
        assert record(store, "/bfs/l").clean == 0

    def test_a_flush_marks_its_snapshot_clean(self, store: Store) -> None:
        store.create("/bfs/f", 100)
        put(store, "/bfs/f", None, [(0, b"x" * 10), (20, b"y")])
        store.set_size("/bfs/f", 50)
        with lease_of(store, "/bfs/f", 30) as lease:
            snap = lease.begin()
            assert snap.pending == snap.seq == 2 and snap.trunc == 50
            assert record(store, "/bfs/f").pending == 2
            assert lease.renew()
            put(store, "/bfs/f", None, [(30, b"z")])
            assert lease.mark_clean(snap.seq, snap.trunc)
        meta = record(store, "/bfs/f")
        assert (meta.clean, meta.pending, meta.trunc, meta.bfs, meta.seq) == (2, 0, None, True, 3)
        assert meta.dirty and not store.leased("/bfs/f")
        assert not lease.mark_clean(3, None)                   # the lease ended with the mark

    def test_mark_clean_keeps_a_newer_truncation(self, store: Store) -> None:
        store.create("/bfs/nt", 100)
        store.set_size("/bfs/nt", 80)
        lease = lease_of(store, "/bfs/nt", 30)
        snap = lease.begin()
        store.set_size("/bfs/nt", 40)                          # a second, lower cut during the flush
        assert lease.mark_clean(snap.seq, snap.trunc)
        assert record(store, "/bfs/nt").trunc == 40

    def test_an_exception_gives_the_lease_back(self, store: Store) -> None:
        store.create("/bfs/e", None)
        put(store, "/bfs/e", None, [(0, b"x")])
        with pytest.raises(OSError), lease_of(store, "/bfs/e", 30) as lease:
            lease.begin()
            raise OSError("the BFS failed")
        meta = record(store, "/bfs/e")
        assert not store.leased("/bfs/e") and meta.pending == 0 and meta.clean == 0 and meta.dirty
        other = FlushLease(store, "/bfs/e", "someone-else", 30)
        other.release()                                        # a stranger's release changes nothing

    def test_a_lease_expires(self, store: Store) -> None:
        store.create("/bfs/x", None)
        token = store.lease("/bfs/x", 0.2)
        assert token and store.lease("/bfs/x", 30) is None
        assert wait_for(lambda: not store.leased("/bfs/x"), timeout=10)
        assert not store.renew("/bfs/x", token, 30)
        assert store.lease("/bfs/x", 30) is not None

    def test_lease_and_begin_takes_each_free_lease_and_begins_its_snapshot(self, store: Store) -> None:
        for path in ("/bfs/m1", "/bfs/m2", "/bfs/m3"):
            store.create(path, None)
        put(store, "/bfs/m1", None, [(0, b"x" * 10), (20, b"y")])
        put(store, "/bfs/m2", None, [(0, b"z")])
        other = store.lease("/bfs/m2", 30)                    # another flush holds this one
        got = store.lease_and_begin(["/bfs/m1", "/bfs/m2", "/bfs/m3", "/bfs/gone"], 30)
        assert got[1] is None
        assert record(store, "/bfs/m2").pending == 0          # nothing of a file held by another is changed
        assert store.renew("/bfs/m2", other or "", 30)
        (t1, snap1), (t3, snap3), (t4, snap4) = (must_take(got[i]) for i in (0, 2, 3))
        assert len({t1, t3, t4}) == 3
        assert (snap1.path, snap1.seq, snap1.pending) == ("/bfs/m1", 2, 2) and record(store, "/bfs/m1").pending == 2
        assert (snap3.path, snap3.seq) == ("/bfs/m3", 0) and snap4.path == ""   # no record: an empty one
        assert store.leased("/bfs/m1") and store.lease("/bfs/m1", 30) is None
        assert store.renew("/bfs/m1", t1, 30) and not store.renew("/bfs/m1", t3, 30)
        assert store.mark_clean("/bfs/m1", t1, snap1.seq, None)
        assert not record(store, "/bfs/m1").dirty

    def test_index_many_lists_each_window_as_index_does(self, store: Store) -> None:
        store.create("/bfs/i1", None)
        store.create("/bfs/i2", None)
        put(store, "/bfs/i1", None, [(0, b"a" * 100), (4096, b"b" * 10)])
        upto = put(store, "/bfs/i1", None, [(50, b"c" * 100)]) - 1    # the first batch only
        put_runs(store, "/bfs/i2", None, [(0, b"x" * 80, 8, 20)])         # a strided run: one entry
        windows = [("/bfs/i1", 0, 200, None), ("/bfs/i1", 0, 5000, upto), ("/bfs/i2", 40, 80, None),
                   ("/bfs/none", 0, 10, None)]
        got = store.index_many(windows)
        assert got == [store.index(*w) for w in windows]
        assert [(e.start, e.length) for e in got[0]] == [(0, 100), (50, 100)]
        assert [(e.start, e.length) for e in got[1]] == [(0, 100), (4096, 10)]
        assert len(got[2]) == 1 and isinstance(got[2][0], Strided) and got[3] == []
        assert store.index_many([]) == []

    def test_renew_many_extends_each_lease_still_held(self, store: Store) -> None:
        for path in ("/bfs/r1", "/bfs/r2", "/bfs/r3"):
            store.create(path, None)
        t1, t2 = store.lease("/bfs/r1", 30), store.lease("/bfs/r2", 30)
        assert t1 and t2
        store.release("/bfs/r2", t2)                                      # lost: given back
        assert store.renew_many([("/bfs/r1", t1), ("/bfs/r2", t2), ("/bfs/r3", "none"), ("/bfs/r1", "x")], 0.2) == \
            [True, False, False, False]
        assert store.lease("/bfs/r2", 30) is not None and store.lease("/bfs/r3", 30) is not None   # none made
        assert wait_for(lambda: not store.leased("/bfs/r1"), timeout=10)  # renewed to 0.2 s from 30
        assert store.renew_many([], 30) == []

    def test_mark_clean_many_marks_each_file_whose_lease_is_held(self, store: Store) -> None:
        paths = ["/bfs/c1", "/bfs/c2", "/bfs/c3"]
        for path in paths:
            store.create(path, 100)
            put(store, path, None, [(0, b"x" * 10)])
        store.set_size("/bfs/c3", 50)
        taken = [must_take(one) for one in store.lease_and_begin(paths, 30)]
        put(store, "/bfs/c1", None, [(30, b"late")])          # written after the snapshot: stays dirty
        store.release("/bfs/c2", taken[1][0])                 # c2's lease lost (given back by a failed flusher)
        done = store.mark_clean_many([(p, token, snap.seq, snap.trunc) for p, (token, snap) in zip(paths, taken)])
        assert done == [True, False, True]
        c1, c2, c3 = (record(store, p) for p in paths)
        assert (c1.clean, c1.dirty, c1.bfs, c1.pending) == (taken[0][1].seq, True, True, 0) and c1.seq > c1.clean
        assert (c2.clean, c2.dirty) == (0, True)
        assert (c3.clean, c3.trunc, c3.dirty) == (taken[2][1].seq, None, False)
        assert not any(store.leased(p) for p in paths)
        assert store.mark_clean_many([]) == []

    # -- channels -----------------------------------------------------------
    def test_a_channel_has_one_writer(self, store: Store) -> None:
        assert store.channel_states([0, 1]) == [(False, 0, 0), (False, 0, 0)]
        token = store.channel_open(1)
        assert token and store.channel_open(1) is None
        assert store.channel_states([1]) == [(True, 0, 0)]
        store.channel_close(1, "not-the-token")
        assert store.channel_states([1])[0].open
        store.channel_close(1, token)
        assert not store.channel_states([1])[0].open
        assert store.channel_open(1) is not None

    def test_channel_data_and_reset(self, store: Store) -> None:
        token = store.channel_open(3)
        assert token is not None
        pieces = [bytes([i]) * (i + 1) for i in range(10)]
        store.channel_append(3, pieces[:4])
        store.channel_append(3, pieces[4:], stored=True)
        store.channel_close(3, token)
        assert store.channel_states([3, 2]) == [(False, sum(map(len, pieces)), 1), (False, 0, 0)]
        assert store.channel_read(3, 0, 100) == pieces
        assert store.channel_read(3, 8, 5) == pieces[8:] and store.channel_read(3, 20, 5) == []
        store.channel_append(3, [], stored=True)                 # an empty store still counts
        assert store.channel_states([3])[0].stores == 2
        assert store.channel_open(2) and store.channel_open(3)
        assert store.channel_reset([1, 2, 3]) == [False, True, True]
        assert not any(s.open for s in store.channel_states([1, 2, 3]))
        assert store.channel_read(3, 0, 100) == pieces           # a reset keeps the data
        assert not store.empty()

    # -- request queue ------------------------------------------------------
    def test_the_queue_is_first_in_first_out(self, store: Store) -> None:
        assert store.queued() == 0 and store.dequeue() is None
        for i in range(3):
            store.enqueue(b"request %d" % i)
        assert store.queued() == 3 and not store.empty()
        assert [store.dequeue(), store.dequeue(timeout=1)] == [b"request 0", b"request 1"]
        assert store.dequeue() == b"request 2" and store.queued() == 0

    def test_dequeue_waits_at_most_its_timeout(self, store: Store) -> None:
        started = time.monotonic()
        assert store.dequeue(timeout=0.2) is None
        assert 0.1 <= time.monotonic() - started < 5

    # -- shared file pointers -----------------------------------------------
    def test_shared_pointers(self, store: Store) -> None:
        assert store.shared_pointer("/bfs/sp", "open1") == 0             # starts at 0
        assert store.shared_pointer("/bfs/sp", "open1", 100) == 0        # the value before the move
        assert store.shared_pointer("/bfs/sp", "open1", 50) == 100
        assert store.shared_pointer("/bfs/sp", "open2", 7) == 0          # one pointer per open
        store.set_shared_pointer("/bfs/sp", "open1", 5)
        assert store.shared_pointer("/bfs/sp", "open1") == 5
        store.drop_shared_pointer("/bfs/sp", "open1")
        assert store.shared_pointer("/bfs/sp", "open1") == 0
        store.drop_shared_pointer("/bfs/sp", "open1")
        store.drop_shared_pointer("/bfs/sp", "open2")
        assert store.empty()

    # -- I/O statistics -----------------------------------------------------
    def test_stats_add_up_per_file_and_process(self, store: Store) -> None:
        assert store.stats() == ({}, [])
        store.stats_add("/bfs/s", "rank 0", {"write_calls": 3, "write_bytes": 12288})
        store.stats_add("/bfs/s", "rank 0", {"write_calls": 1, "write_bytes": 4096, "read_calls": 2})
        store.stats_add("/bfs/s", "rank 1", {"write_calls": 5})
        store.stats_add("/bfs/t u", "pid 7", {"read_bytes": 1 << 40})
        store.stats_add("/bfs/s", "rank 1", {})
        counters, log = store.stats()
        assert counters == {"/bfs/s": {"rank 0": {"write_calls": 4, "write_bytes": 16384, "read_calls": 2},
                                       "rank 1": {"write_calls": 5}},
                            "/bfs/t u": {"pid 7": {"read_bytes": 1 << 40}}}
        assert log == []

    def test_a_writer_adds_counters_with_its_batch_in_flight(self, store: Store) -> None:
        store.create("/bfs/s", None)
        w = store.writer()
        try:
            w.stats_add("/bfs/s", "p", {"writes": 1})   # no batch in flight: added at once
            w.send("/bfs/s", 0, b"abc", [(0, 0, 3)])
            w.stats_add("/bfs/s", "p", {"writes": 2, "bytes": 3})
            assert w.finish() == 1
            w.send("/bfs/t", 0, b"x", [(0, 0, 1)])   # no record: the batch is refused, the counters count
            w.stats_add("/bfs/t", "q", {"writes": 1})
            with pytest.raises(RecordGone):
                w.finish()
        finally:
            w.close()
        assert store.stats()[0] == {"/bfs/s": {"p": {"writes": 3, "bytes": 3}}, "/bfs/t": {"q": {"writes": 1}}}
        assert current(store, "/bfs/s", 0, 3) == b"abc"

    def test_stats_log_keeps_events_in_order(self, store: Store) -> None:
        event = {"kind": "flush", "path": "/bfs/s", "bytes": 10, "sizes": {"4096": 2}}
        store.stats_log(event)
        event["bytes"] = 99                    # the store keeps what was logged, not the caller's dict
        store.stats_log({"kind": "flush", "path": "/bfs/t", "seconds": 0.5})
        assert store.stats()[1] == [{"kind": "flush", "path": "/bfs/s", "bytes": 10, "sizes": {"4096": 2}},
                                    {"kind": "flush", "path": "/bfs/t", "seconds": 0.5}]

    def test_stats_log_many_appends_every_event_in_order(self, store: Store) -> None:
        store.stats_log({"kind": "sync", "path": "/bfs/a"})
        events = [{"kind": "flush", "path": f"/bfs/f{i}", "bytes": i} for i in range(5)]
        store.stats_log_many(events)
        store.stats_log_many([])
        events[0]["bytes"] = 99                # the store keeps what was logged, not the caller's dicts
        assert store.stats()[1] == [{"kind": "sync", "path": "/bfs/a"},
                                    *({"kind": "flush", "path": f"/bfs/f{i}", "bytes": i} for i in range(5))]

    def test_stats_are_not_data(self, store: Store) -> None:
        store.stats_add("/bfs/s", "rank 0", {"write_calls": 1})
        store.stats_log({"kind": "flush"})
        assert store.empty()
        store.create("/bfs/s", None)
        store.drop("/bfs/s")
        assert store.stats()[0] == {"/bfs/s": {"rank 0": {"write_calls": 1}}}

    # -- the whole store ----------------------------------------------------
    def test_memory_grows_with_data(self, store: Store) -> None:
        used, limit = store.memory()
        assert used >= 0 and limit >= 0
        store.create("/bfs/m", None)
        put(store, "/bfs/m", None, [(0, b"m" * (2 << 20))])
        assert store.memory()[0] >= used + (1 << 20)

    def test_node_memory_adds_up_to_memory(self, store: Store) -> None:
        store.create("/bfs/nm", None)
        put(store, "/bfs/nm", None, [(0, b"n" * (2 << 20))])
        # A server's own use moves between two reads (its cron frees a big write's query buffer):
        # the sum must match at one of a few tries, as it would not if node_memory were wrong.
        for _ in range(5):
            each = store.node_memory()
            used, limit = store.memory()
            if abs(sum(u for u, _ in each) - used) < (1 << 20):
                break
        assert each and all(u >= 0 and lim >= 0 for u, lim in each)
        assert abs(sum(u for u, _ in each) - used) < (1 << 20)
        assert limit == (0 if any(lim == 0 for _, lim in each) else sum(lim for _, lim in each))

    def test_traffic_counts_what_the_servers_received(self, store: Store) -> None:
        before = store.traffic()
        store.create("/bfs/tr", None)
        put(store, "/bfs/tr", None, [(0, b"t" * (1 << 20))])
        assert current(store, "/bfs/tr", 0, 1 << 20) == b"t" * (1 << 20)
        after = store.traffic()
        if before is None:                                            # no server: the memory store
            assert after is None and isinstance(store, MemoryStore)
            return
        assert after is not None
        assert after[0] >= before[0] + (1 << 20) and after[1] >= before[1] + (1 << 20)

    def test_close_keeps_the_data(self, store: Store, reopen: Callable[[], Store]) -> None:
        store.create("/bfs/cl", None)
        put(store, "/bfs/cl", None, [(0, b"kept")])
        store.close()
        again = reopen()
        try:
            assert current(again, "/bfs/cl", 0, 4) == b"kept" and record(again, "/bfs/cl").size == 4
        finally:
            again.close()

    def test_empty(self, store: Store) -> None:
        assert store.empty()
        store.enqueue(b"x")
        assert not store.empty()
        store.dequeue()
        assert store.empty()


def data_of_first(data: bytes, block: int, stride: int, size: int) -> bytes:
    """The image of a file holding only the strided run ``data`` of ``block``-byte blocks ``stride`` apart."""
    image = bytearray(size)
    for k in range(len(data) // block):
        image[k * stride:k * stride + block] = data[k * block:(k + 1) * block]
    return bytes(image)


class FullStoreTests:
    """Behaviour of a store at its memory limit; subclasses provide ``small_store`` (an empty store of ~8 MiB)."""

    def test_a_full_store_refuses_commits_and_keeps_what_it_has(self, small_store: Store) -> None:
        small_store.create("/bfs/full", None)
        model = Model()
        block = random.Random(0).randbytes(1 << 20)
        with pytest.raises(TierFullError, match="--capacity"):
            for i in range(64):
                put(small_store, "/bfs/full", model, [(i << 20, block)])
        kept = record(small_store, "/bfs/full").size
        assert kept >= 1 << 20
        assert current(small_store, "/bfs/full", 0, kept) == bytes(model.data[:kept])
        # the flush's bookkeeping still works on a full store: it is what makes room
        with lease_of(small_store, "/bfs/full", 30) as lease:
            assert lease.mark_clean(lease.begin().seq, None)
        writer = small_store.writer()
        try:   # a new file's first batch on the full store: refused; ``made`` tells whether its record is there
            writer.send("/bfs/new", 1, block, [(0, 0, len(block))], closing=True, new=NewFile(0o022))
            with pytest.raises((TierFullError, RecordGone)):
                writer.finish()
            assert writer.made == (small_store.meta("/bfs/new") is not None)
        finally:
            writer.close()
        assert small_store.drop_clean("/bfs/full") == kept
        put(small_store, "/bfs/full", None, [(0, block)])       # room again
