"""Residency controls: purge, pin, prestage, frag_stat, ls/stat/cat/rm, the engine.

The controls are unit tests on the memory store (``mem_atier``: they reach
the tier through the ``Store`` interface, whose contract ``tests/test_store.py``
runs on both engines); the engine's tests run a real server and engine
(``small_run``), and ``tests/test_cli_residency.py`` runs the same controls
through the CLI against a real server.
"""

from __future__ import annotations

import os
import random
import stat as statmod

import pytest

from mpiburst import engine_process, flush, residency, server
from mpiburst.errors import MpiburstError, PathError
from mpiburst.tier import Tier

from mpiburst.testing import Model, put, put_runs

from conftest import bfs_file, wait_until


def _file(tier, name: str, size: int = 300_000, seed: int = 0) -> tuple[str, Model]:
    store = tier.store
    path = bfs_file(tier, name)
    store.create(path, None)
    model = Model()
    put(store, path, model, [(0, random.Random(seed).randbytes(size))])
    return path, model


@pytest.mark.timeout(60)
def test_purge_of_dirty_data_needs_force(mem_atier):
    path, _ = _file(mem_atier, "dirty.dat")
    with pytest.raises(MpiburstError, match="not yet on the BFS.*--force"):
        residency.purge(path, tier=mem_atier)
    assert mem_atier.store.meta(path).dirty
    assert residency.purge(path, force=True, tier=mem_atier) == 300_000
    assert mem_atier.store.meta(path) is None
    assert not os.path.exists(path)


@pytest.mark.timeout(60)
def test_purge_clean_only_keeps_dirty_data(mem_atier):
    path, model = _file(mem_atier, "mixed.dat")
    flush.sync(path, tier=mem_atier)
    store = mem_atier.store
    put(store, path, model, [(1000, b"d" * 2000)])
    freed = residency.purge(path, clean_only=True, tier=mem_atier)
    assert freed == 300_000
    fs = residency.frag_stat(path, tier=mem_atier)
    assert (fs.dirty, fs.clean) == (2000, 0)
    assert b"".join(residency.read(path, tier=mem_atier)) == bytes(model.data)
    flush.sync(path, tier=mem_atier)
    residency.purge(path, tier=mem_atier)                    # all clean now: no force needed
    assert open(path, "rb").read() == bytes(model.data)


@pytest.mark.timeout(60)
def test_frag_stat_of_strided_runs(mem_atier):
    """Strided runs count per block: clean after a flush, dirty after, and shadowed blocks are deletable."""
    path = bfs_file(mem_atier, "runs.dat")
    store = mem_atier.store
    store.create(path, None)
    put_runs(store, path, None, [(0, bytes(1000 * 64), 1000, 3000)])            # 64 blocks, gaps between
    assert residency.frag_stat(path, tier=mem_atier) == residency.FragStat(dirty=64_000, pending=0, clean=0,
                                                                       deletable=0)
    flush.sync(path, tier=mem_atier)
    put_runs(store, path, None, [(2000, bytes(500 * 10), 500, 3000)])          # in the gaps: nothing shadowed
    assert residency.frag_stat(path, tier=mem_atier) == residency.FragStat(5_000, 0, 64_000, 0)
    put_runs(store, path, None, [(500, bytes(1000 * 4), 1000, 6000)])          # half of 4 old blocks each
    assert residency.frag_stat(path, tier=mem_atier) == residency.FragStat(9_000, 0, 62_000, 2_000)


def test_frag_stat_states(mem_atier):
    """dirty / pending / clean / deletable add up to the tier's bytes and follow the flush."""
    path, _ = _file(mem_atier, "states.dat", size=100_000)
    store = mem_atier.store
    put(store, path, None, [(0, b"n" * 40_000)])          # shadows 40,000 older bytes
    fs = residency.frag_stat(path, tier=mem_atier)
    assert fs == residency.FragStat(dirty=100_000, pending=0, clean=0, deletable=40_000)
    flush.sync(path, tier=mem_atier)
    assert residency.frag_stat(path, tier=mem_atier) == residency.FragStat(0, 0, 100_000, 40_000)
    put(store, path, None, [(200_000, b"p" * 1000)])
    seen = []
    flush.writes.write_observers.append(lambda p, o, n: seen.append(residency.frag_stat(path, tier=mem_atier)))
    try:
        flush.sync(path, tier=mem_atier)
    finally:
        flush.writes.write_observers.clear()
    assert seen[0].pending == 1000 and seen[0].dirty == 0
    assert residency.frag_stat(path, tier=mem_atier).clean == 101_000


@pytest.mark.timeout(60)
def test_prestage_then_reads_come_from_the_tier(mem_atier):
    """After prestage the BFS file can change: reads still see the staged bytes; writes win over them."""
    path = bfs_file(mem_atier, "input.dat")
    data = random.Random(1).randbytes(1_000_000)
    with open(path, "wb") as f:
        f.write(data)
    assert residency.prestage(path, tier=mem_atier) == len(data)
    fs = residency.frag_stat(path, tier=mem_atier)
    assert (fs.clean, fs.dirty) == (len(data), 0)
    with open(path, "r+b") as f:
        f.write(b"X" * 5000)                              # the BFS changes behind the tier's back
    assert b"".join(residency.read(path, tier=mem_atier)) == data
    put(mem_atier.store, path, None, [(10, b"W" * 10)])
    assert b"".join(residency.read(path, tier=mem_atier))[:30] == data[:10] + b"W" * 10 + data[20:30]
    assert residency.prestage(path, keep=True, tier=mem_atier) == 0    # -K: everything is already there
    assert residency.prestage(path, tier=mem_atier) == len(data) - 10  # refresh clean data; the write stays
    assert b"".join(residency.read(path, tier=mem_atier))[:30] == b"X" * 10 + b"W" * 10 + b"X" * 10


@pytest.mark.timeout(30)
def test_prestage_and_pin_errors(mem_atier):
    with pytest.raises(PathError, match="not a file on the BFS"):
        residency.prestage("burst://missing", tier=mem_atier)
    with pytest.raises(PathError, match="neither in the tier nor on the BFS"):
        residency.pin("burst://missing", tier=mem_atier)
    with pytest.raises(PathError, match="not in the tier"):
        residency.frag_stat("burst://missing", tier=mem_atier)


@pytest.mark.timeout(60)
def test_prestage_of_a_file_removed_meanwhile_is_a_path_error(mem_atier):
    """The store's RecordGone (no record: the file was removed) never reaches the caller as such."""
    path = os.path.join(mem_atier.bfs_root, "gone.dat")
    with open(path, "wb") as f:
        f.write(os.urandom(residency.PRESTAGE_CHUNK + 4096))

    def remove_after_the_first_chunk(done: int) -> None:
        if done == residency.PRESTAGE_CHUNK:
            mem_atier.store.drop(path)

    with pytest.raises(PathError, match="removed from the tier while it was prestaged"):
        residency.prestage(path, tier=mem_atier, progress=remove_after_the_first_chunk)
    assert mem_atier.store.meta(path) is None


@pytest.mark.timeout(60)
def test_ls_stat_cat_rm_and_expand(mem_atier):
    a, model = _file(mem_atier, "d/a.dat", seed=1)
    b, _ = _file(mem_atier, "d/sub/b.dat", seed=2)
    flush.sync(b, tier=mem_atier)
    assert [m.path for m in residency.ls(tier=mem_atier)] == [a, b]
    assert [m.path for m in residency.ls("burst://d/sub", tier=mem_atier)] == [b]
    info = residency.stat(a, tier=mem_atier)
    assert info["size"] == 300_000 and info["dirty"] == 300_000 and info["bfs_size"] is None
    assert b"".join(residency.read("burst://d/a.dat", tier=mem_atier)) == bytes(model.data)
    with pytest.raises(PathError, match="is a directory; add -r"):
        residency.expand(["burst://d"], recursive=False, tier=mem_atier)
    assert residency.expand(["burst://d"], recursive=True, tier=mem_atier) == [a, b]
    residency.rm(b, tier=mem_atier)
    assert not os.path.exists(b) and mem_atier.store.meta(b) is None
    with pytest.raises(PathError, match="neither in the tier nor on the BFS"):
        residency.rm(b, tier=mem_atier)


@pytest.mark.timeout(60)
def test_make_room_syncs_and_frees_unpinned_files(mem_atier):
    a, model = _file(mem_atier, "room/a.dat", seed=3)
    p, _ = _file(mem_atier, "room/pinned.dat", seed=4)
    residency.pin(p, tier=mem_atier)
    assert residency.make_room(mem_atier) is True
    assert open(a, "rb").read() == bytes(model.data)
    assert residency.frag_stat(a, tier=mem_atier) == residency.FragStat()
    assert mem_atier.store.meta(p).dirty and not os.path.exists(p)
    assert residency.make_room(mem_atier) is False


# ----------------------------------------------------------------------------- the engine

@pytest.fixture
def small_run(tmp_path, server_binary):
    """A real run with a 48 MiB tier, thresholds 0.5 / 0.8, and its engine (stopped at teardown)."""
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    tier = Tier.start(id=f"eng{os.getpid()}", dir=str(tmp_path), bfs_root=str(bfs), capacity="48M",
                      server=server_binary, align="64K")
    try:
        yield tier, tier.conf.engine_pid  # Tier.start starts the engine beside the server
    finally:
        tier.stop()


@pytest.mark.timeout(120)
def test_engine_syncs_and_purges_unpinned_files_only(small_run):
    """Past the thresholds the engine syncs and frees the unpinned file; the pinned one stays dirty and in memory.

    The writer waits while the tier is past the purge threshold, as a driver facing a full tier would; only the engine
    can bring the memory down (the test never syncs or purges itself).
    """
    tier, pid = small_run
    store = tier.store
    admin = tier.admin()

    def used() -> float:
        return int(admin.info("memory")["used_memory"]) / tier.capacity

    pinned = bfs_file(tier, "pinned.dat")
    store.create(pinned, None)
    residency.pin(pinned, tier=tier)
    rnd = random.Random(5)
    put(store, pinned, None, [(o, rnd.randbytes(1 << 20)) for o in range(0, 4 << 20, 1 << 20)])
    free = bfs_file(tier, "free.dat")
    store.create(free, None)
    model = Model()
    for base in range(0, 48 << 20, 4 << 20):             # 48 MiB through a 48 MiB tier, with the pinned 4 MiB:
                                                          # the loop ends only if the engine frees clean data
        assert wait_until(lambda: used() < tier.conf.purge_threshold), "the engine did not free memory"
        put(store, free, model, [(base + o, rnd.randbytes(1 << 20)) for o in range(0, 4 << 20, 1 << 20)])
    assert wait_until(lambda: store.meta(free).clean > 0), "the engine never synced"  # it works in the background
    assert residency.frag_stat(free, tier=tier).clean < 48 << 20      # ... and freed clean data
    flush.sync(free, tier=tier)                                        # the rest (below the threshold now)
    assert open(free, "rb").read() == bytes(model.data)
    assert residency.frag_stat(pinned, tier=tier).dirty == 4 << 20    # never synced, never purged
    assert not os.path.exists(pinned)
    log = engine_process.log_path(tier.conf)
    assert statmod.S_IMODE(os.stat(log).st_mode) == 0o600
    assert "purged" in open(log).read()


@pytest.mark.timeout(120)
def test_engine_serves_queued_sync_and_prestage_and_exits_with_the_server(small_run):
    tier, pid = small_run
    path, model = _file(tier, "queued.dat")
    src = bfs_file(tier, "input.dat")
    with open(src, "wb") as f:
        f.write(b"i" * 200_000)
    flush.sync(path, tier=tier, block=False)
    residency.prestage(src, tier=tier, block=False)
    assert residency.wait_clean(path, tier=tier, timeout=30)
    assert open(path, "rb").read() == bytes(model.data)
    assert wait_until(lambda: residency.frag_stat(src, tier=tier).clean == 200_000 if tier.store.meta(src)
                 else False)
    tier.store.enqueue(b"not json")              # a bad request is logged, the engine goes on
    flush.sync(path, tier=tier, block=False)
    assert wait_until(lambda: tier.store.queued() == 0)
    assert server.pid_alive(pid)
    assert wait_until(lambda: "malformed request" in open(engine_process.log_path(tier.conf)).read())
    tier.stop()
    assert wait_until(lambda: not server.pid_alive(pid), 10)
