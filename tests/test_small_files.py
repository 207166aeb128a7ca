"""Many small files (#25): what one Open, Write_at and Close of a new file costs the tier, on the memory store.

The cost is counted in store calls (each a round trip on a server), never
timed: a new file takes a fixed, short list of calls, the same whether the
tier holds no other file or hundreds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import on_bfs
from mpi4py import MPI

import mpiburst
from mpiburst.paths import locate, resolve
from mpiburst.perms import current_umask
from mpiburst.tier import Tier


class Counting:
    """A store that records the name of every method called on it, then calls the real one.

    The batch writers it hands out are counted too, their calls as ``writer.<name>``.
    """

    def __init__(self, store: Any, calls: list[str] | None = None, prefix: str = "") -> None:
        self._store = store
        self._prefix = prefix
        self.calls: list[str] = [] if calls is None else calls

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value) or name.startswith("_"):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(self._prefix + name)
            got = value(*args, **kwargs)
            return Counting(got, self.calls, "writer.") if name == "writer" else got

        return call


def _one_file(url: str, data: np.ndarray) -> None:
    f = mpiburst.File.Open(MPI.COMM_SELF, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    f.Write_at(0, data)
    f.Close()


def test_a_new_file_costs_the_same_few_store_calls_however_many_files_the_tier_holds(mem_tier):
    counting = Counting(mem_tier.store)
    mem_tier.store = counting
    data = np.arange(4096, dtype=np.uint8)
    _one_file("burst://first/f", data)
    first, counting.calls = counting.calls, []
    for i in range(200):
        _one_file(f"burst://many/f{i}", data)
    counting.calls = []
    _one_file("burst://last/f", data)
    # nothing at the Open; at the Close the write-back buffer's batch (its connection: the writer) makes the record
    # (create-if-absent, the writer counted in) and counts the writer out, with the I/O counters behind it (their
    # answer read with the batch's), the replicas' confirmation (#23: no round trip without replicas): one round
    # trip; no read of the record, no listing
    assert first == counting.calls == ["writer", "writer.send", "writer.stats_add", "writer.finish", "writer.close",
                                       "confirm"]
    meta = mem_tier.store.meta(resolve("burst://last/f", mem_tier.bfs_root))
    assert meta.writers == 0 and meta.size == 4096 and meta.unlooked and meta.umask == current_umask()
    assert mpiburst.open("burst://last/f", "rb", tier=mem_tier).read() == data.tobytes()


def test_the_shared_pointer_of_a_file_opened_at_zero_is_made_only_when_used(mem_tier):
    store = mem_tier.store
    data = np.full(100, 7, dtype=np.uint8)
    _one_file("burst://plain", data)
    f = mpiburst.File.Open(MPI.COMM_SELF, "burst://shared", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    f.Write_shared(data)
    f.Write_shared(data)
    assert f.Get_position_shared() == 200   # a pointer the tier did not hold started at 0
    f.Close()
    assert store._pointers == {}   # the used one was dropped at Close, the unused one never made
    f = mpiburst.File.Open(MPI.COMM_SELF, "burst://shared", MPI.MODE_WRONLY | MPI.MODE_APPEND)
    assert f.Get_position_shared() == 200   # MODE_APPEND starts both pointers at the end
    f.Close()
    assert store._pointers == {}


def test_an_open_of_an_existing_file_keeps_its_record(mem_tier):
    _one_file("burst://kept", np.full(10, 1, dtype=np.uint8))
    f = mpiburst.File.Open(MPI.COMM_SELF, "burst://kept", MPI.MODE_RDWR | MPI.MODE_CREATE)
    assert f.Get_size() == 10       # create-if-absent left the record (and its size) as it was
    f.Close()
    with pytest.raises(MPI.Exception) as err:
        mpiburst.File.Open(MPI.COMM_SELF, "burst://kept", MPI.MODE_WRONLY | MPI.MODE_CREATE | MPI.MODE_EXCL)
    assert err.value.Get_error_class() == MPI.ERR_FILE_EXISTS


def test_locate_looks_up_only_below_the_root_and_agrees_with_realpath(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"xyz")
    (root / "ln").symlink_to(root / "a")
    looked: list[str] = []
    real_lstat: Callable[..., os.stat_result] = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: looked.append(str(p)) or real_lstat(p, *a, **k))
    resolve("burst://a", str(root))   # the root's own resolution, once per process
    looked.clear()
    assert locate("burst://a/b/f", str(root)) == (str(root / "a/b/f"), real_lstat(root / "a/b/f"))
    assert looked == [str(root / "a"), str(root / "a/b"), str(root / "a/b/f")]
    looked.clear()
    assert locate("burst://new/dir/f", str(root)) == (str(root / "new/dir/f"), None)
    assert looked == [str(root / "new")]   # nothing below a missing directory is looked up
    monkeypatch.undo()
    for rest in ("a/b/f", "a//b/./f", "ln/b/f", "a/../a/b/f", "ln/b/missing", "a/b/f/below"):
        real = os.path.realpath(root / rest)
        path, found = locate(f"burst://{rest}", str(root))
        assert path == real, rest
        assert (found is None) == (not os.path.exists(real)), rest


def test_listdir_shows_a_directory_of_the_tier_and_the_bfs_together(mem_tier):
    bfs = mem_tier.bfs_root
    os.makedirs(os.path.join(bfs, "ckpt", "old"))
    with open(os.path.join(bfs, "ckpt", "on-bfs"), "wb") as f:
        f.write(b"x")
    for hidden in (".both.mpiburst-1234", ".both.mpiburst.lock"):   # a flush's own files beside its target
        with open(os.path.join(bfs, "ckpt", hidden), "wb") as f:
            f.write(b"")
    data = np.zeros(10, dtype=np.uint8)
    for name in ("both", "new/r0.dat", "new/r1.dat", "rank0.dat"):
        _one_file(f"burst://ckpt/{name}", data)
    with open(os.path.join(bfs, "ckpt", "both"), "wb") as f:
        f.write(b"older")
    assert mpiburst.listdir("burst://ckpt") == ["both", "new", "old", "on-bfs", "rank0.dat"]
    assert mpiburst.listdir("burst://ckpt/new/") == ["r0.dat", "r1.dat"]   # only in the tier so far
    assert mpiburst.listdir("burst://") == ["ckpt"]
    for bad, says in (("burst://ckpt/rank0.dat", "is a file"), ("burst://ckpt/on-bfs", "is a file"),
                      ("burst://nothing", "is no directory")):
        with pytest.raises(mpiburst.PathError, match=says):
            mpiburst.listdir(bad)


def test_rmtree_removes_the_tier_files_and_the_bfs_tree_unless_one_is_being_flushed(mem_tier):
    bfs = mem_tier.bfs_root
    data = np.zeros(10, dtype=np.uint8)
    for i in range(3):
        _one_file(f"burst://out/r{i}/data", data)
    _one_file("burst://keep", data)
    os.makedirs(os.path.join(bfs, "out", "flushed"))
    with open(os.path.join(bfs, "out", "flushed", "f"), "wb") as f:
        f.write(b"x")
    lease = mem_tier.store.flush_lease(resolve("burst://out/r1/data", bfs), 30)
    with pytest.raises(mpiburst.MpiburstError, match="a flush of .*r1/data is running"):
        mpiburst.rmtree("burst://out")
    assert len(mpiburst.listdir("burst://out")) == 4   # nothing removed
    lease.release()
    assert mpiburst.rmtree("burst://out") == 3
    assert not os.path.exists(os.path.join(bfs, "out"))
    assert [m.path for m in mpiburst.residency.ls(tier=mem_tier)] == [resolve("burst://keep", bfs)]
    with pytest.raises(mpiburst.PathError, match="BFS root"):
        mpiburst.rmtree("burst:///" + bfs.lstrip("/"))
    with pytest.raises(mpiburst.PathError, match="is a file"):
        mpiburst.rmtree("burst://keep")


def test_delete_has_mpi_semantics_and_waits_for_no_flush(mem_tier):
    with pytest.raises(MPI.Exception) as err:
        mpiburst.File.Delete("burst://never")
    assert err.value.Get_error_class() == MPI.ERR_NO_SUCH_FILE
    _one_file("burst://busy", np.zeros(10, dtype=np.uint8))
    lease = mem_tier.store.flush_lease(resolve("burst://busy", mem_tier.bfs_root), 30)
    with pytest.raises(MPI.Exception) as err:
        mpiburst.File.Delete("burst://busy")   # the flush would put it back
    assert err.value.Get_error_class() == MPI.ERR_FILE_IN_USE
    lease.release()
    mpiburst.File.Delete("burst://busy")
    assert mpiburst.residency.ls(tier=mem_tier) == []


# ----------------------------------------------------------------------------- many files committed at once

def _files(tier: Any, n: int, directory: str = "ckpt") -> dict[str, bytes]:
    """Write ``n`` files of varied sizes (some over a stripe) under ``burst://<directory>/``; return path -> bytes."""
    rng = np.random.default_rng(n)
    out = {}
    for i in range(n):
        data = rng.integers(0, 256, int(rng.choice([1, 4096, 65_536, 70_001, 2 << 20])), dtype=np.uint8).tobytes()
        with mpiburst.open(f"burst://{directory}/r{i % 3}/f{i}", "wb", tier=tier) as f:
            f.write(data)
        out[resolve(f"burst://{directory}/r{i % 3}/f{i}", tier.bfs_root)] = data
    return out


def _leftovers(root: str) -> list[str]:
    """Every file or directory under ``root`` a flush names ``.mpiburst*`` (new versions, staging, locks, journals)."""
    return [os.path.join(d, n) for d, subdirs, names in os.walk(root) for n in names + subdirs if ".mpiburst" in n]


def _make_dirs(files: dict[str, bytes]) -> None:
    """Make the files' directories on the BFS: the commit then renames each file into place, not a new directory."""
    for path in files:
        os.makedirs(os.path.dirname(path), exist_ok=True)


def test_a_commit_of_many_files_is_byte_exact_and_fsyncs_each_file_once(mem_tier, monkeypatch):
    from mpiburst import flush

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    old = os.path.join(mem_tier.bfs_root, "ckpt", "r1", "f1")
    os.makedirs(os.path.dirname(old))
    with open(old, "wb") as f:   # an older, longer version on the BFS: replaced, not merged
        f.write(b"old" * 1_000_000)
    files = _files(mem_tier, 40)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    reports = flush.commit(tier=mem_tier)
    assert [r.path for r in reports] == sorted(files)
    assert on_bfs(files) == files
    assert not any(m.dirty for m in mpiburst.residency.ls(tier=mem_tier))
    assert _leftovers(mem_tier.bfs_root) == []
    journal = [s for s in synced if ".mpiburst-commit-" in s]
    stages = [s for s in synced if ".mpiburst-stage-" in os.path.basename(s)]
    versions = [s for s in synced if s not in journal and s not in stages
                and (".mpiburst-" in os.path.basename(s) or ".mpiburst-stage-" in os.path.dirname(s))]
    assert len(versions) == len(set(versions)) == len(files)      # each new version once: written all, then fsync'd
    root = os.path.realpath(mem_tier.bfs_root)
    rest = sorted(s for s in synced if s not in versions and s not in journal and s not in stages)
    assert len(journal) == 1
    # r1 existed: its files renamed one by one, it fsync'd once; r0 and r2 were new: each staged (its staging
    # directory fsync'd once) and published by one rename in ckpt, fsync'd once; the root for the journal
    assert sorted(os.path.basename(s).split(".mpiburst-")[0] for s in stages) == [".r0", ".r2"]
    assert rest == sorted([os.path.join(root, "ckpt"), os.path.join(root, "ckpt", "r1"), root])


def test_a_commit_lists_a_small_files_index_once_for_its_stripes_and_their_bytes(mem_tier):
    """One listing of a small file's index plans its stripes and assembles its one batch (not a walk, then a listing);
    the listings of all small files, the leases and snapshots, the clean marks and the log entries are one store
    call each per commit, not one per file (#25)."""
    from collections import Counter

    from mpiburst import flush

    files = _files(mem_tier, 12)
    small = sum(len(d) <= 8 << 20 for d in files.values())
    counting = Counting(mem_tier.store)
    mem_tier.store = counting
    assert len(flush.commit(tier=mem_tier)) == 12
    calls = Counter(counting.calls)
    assert calls["index_many"] == 1 and calls["index"] == 0 and calls["walk"] == 12 - small
    assert calls["fetch_into"] >= 12
    assert calls["lease_and_begin"] == calls["mark_clean_many"] == calls["stats_log_many"] == 1
    assert calls["lease"] == calls["begin"] == calls["mark_clean"] == calls["stats_log"] == 0
    assert on_bfs(files) == files


@pytest.mark.parametrize("directories", ["new", "existing"])
def test_a_committed_new_file_ending_in_a_hole_has_its_size(mem_tier, directories):
    """The seal of a commit's new file takes its size from what it wrote, not a stat: a hole at the end is kept."""
    from mpiburst import flush

    if directories == "existing":
        os.makedirs(os.path.join(mem_tier.bfs_root, "holes"))
    with mpiburst.open("burst://holes/f", "wb", tier=mem_tier) as f:
        f.write(b"head")
        f.truncate(3 * mem_tier.align + 5)
    flush.commit(tier=mem_tier)
    path = os.path.join(mem_tier.bfs_root, "holes", "f")
    assert open(path, "rb").read() == b"head" + bytes(3 * mem_tier.align + 1)


@pytest.mark.parametrize("directories", ["new", "existing"])
def test_a_failure_in_the_middle_of_a_commit_publishes_nothing(mem_tier, monkeypatch, directories):
    from mpiburst import flush
    from mpiburst.flush import writes

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier, 30)
    if directories == "existing":
        _make_dirs(files)
    bad = sorted(files)[17]

    def broken(path: str, offset: int, length: int) -> None:
        if path == bad:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(writes, "write_observers", [broken])
    with pytest.raises(mpiburst.FlushError, match="commit of 30 files failed: .*nothing of it was published"):
        flush.commit(tier=mem_tier)
    assert on_bfs(files) == {}                       # not one of the 29 others
    assert all(m.dirty for m in mpiburst.residency.ls(tier=mem_tier))
    assert _leftovers(mem_tier.bfs_root) == []        # no new version, staging directory, lock or journal left
    assert os.path.isdir(os.path.join(mem_tier.bfs_root, "ckpt")) == (directories == "existing")
    monkeypatch.setattr(writes, "write_observers", [])
    assert len(flush.commit(tier=mem_tier)) == 30
    assert on_bfs(files) == files


def test_a_commit_failing_while_renaming_is_completed_by_the_next(mem_tier, monkeypatch):
    from mpiburst import flush

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier, 12)
    _make_dirs(files)
    bad = sorted(files)[5]
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        if dst == bad:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(mpiburst.FlushError, match="while publishing them.*the next sync or commit completes it"):
        flush.commit(tier=mem_tier)
    monkeypatch.setattr(os, "rename", real_rename)
    assert flush.recover(mem_tier.bfs_root) == 1      # the journal names every file of every thread
    assert on_bfs(files) == files


def test_a_commit_takes_one_cut_and_leaves_later_writes_dirty(mem_tier, monkeypatch):
    from mpiburst import flush

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier, 10)
    late = sorted(files)[3]

    def select(path: str) -> bool:   # called after the cut: a write now is past every file's mark
        if path == late:
            with mpiburst.open(late, "r+b", tier=mem_tier) as f:
                f.write(b"LATE")
        return True

    flush.commit(tier=mem_tier, select=select)
    assert on_bfs(files) == files                    # the cut's bytes, not the late write
    assert [m.path for m in mpiburst.residency.ls(tier=mem_tier) if m.dirty] == [late]
    flush.commit(tier=mem_tier)
    assert on_bfs({late: b""})[late] == b"LATE" + files[late][4:]


def test_a_commit_meeting_another_flush_waits_for_it_in_path_order(mem_tier, monkeypatch):
    import threading

    from mpiburst import flush

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier, 8)
    held = mem_tier.store.flush_lease(sorted(files)[6], 30)   # another flush of one file, ending soon
    timer = threading.Timer(0.5, held.release)
    timer.start()
    try:
        assert len(flush.commit(tier=mem_tier)) == 8
    finally:
        timer.cancel()
    assert on_bfs(files) == files
    assert _leftovers(mem_tier.bfs_root) == []


def test_a_lease_lost_during_a_commit_fails_it_and_leaves_that_file_dirty(mem_tier, monkeypatch):
    """The leases of a commit are taken and marked clean at one go (#25): a lease another party ends meanwhile is
    still found (its clean mark refused), the commit says so, and that file stays dirty while the others are clean."""
    from mpiburst import flush
    from mpiburst.flush import writes

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier, 6)
    store = mem_tier.store
    lost = sorted(files)[3]
    tokens: dict[str, str] = {}
    real_take = store.lease_and_begin

    def take(paths, seconds):   # noqa: ANN001, ANN202 - a spy: the real call, its tokens noted
        got = real_take(paths, seconds)
        tokens.update((p, one[0]) for p, one in zip(paths, got) if one is not None)
        return got

    def end_its_lease(path: str, offset: int, length: int) -> None:
        if path == lost:
            store.release(lost, tokens[lost])   # as a flusher that failed gives it back

    monkeypatch.setattr(store, "lease_and_begin", take)
    monkeypatch.setattr(writes, "write_observers", [end_its_lease])
    with pytest.raises(mpiburst.FlushError, match="while publishing them.*flush lease"):
        flush.commit(tier=mem_tier)
    assert set(tokens) == set(files)
    dirty = {m.path for m in mpiburst.residency.ls(tier=mem_tier) if m.dirty}
    assert dirty == {lost}                                  # the others were marked clean
    assert not any(store.leased(p) for p in files)


def test_a_commit_locks_each_directory_once_and_waits_for_another_runs_lock(mem_tier, monkeypatch):
    """One BFS lock per directory (#25), not one per file; another run holding one is waited for, not overrun."""
    import threading

    from mpiburst import flush
    from mpiburst.flush.snapshot import LOCK_NAME, BfsLock

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier, 12)
    _make_dirs(files)   # new directories: one lock, their parent's (tests/test_new_directories.py)
    dirs = sorted({os.path.dirname(p) for p in files})
    locked: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (locked.append(os.fspath(path)) if os.fspath(path).endswith(
        LOCK_NAME) else None, real_open(path, *a, **k))[1])
    assert len(flush.commit(tier=mem_tier)) == 12
    assert sorted(locked) == [os.path.join(d, LOCK_NAME) for d in dirs]   # 3 directories: 3 locks for 12 files
    assert on_bfs(files) == files
    newer = {p: b"newer" + d for p, d in files.items()}
    for path, data in newer.items():
        with mpiburst.open(path, "wb", tier=mem_tier) as f:
            f.write(data)
    other = BfsLock.take(dirs[1])   # another run flushing a file of one directory, ending soon
    timer = threading.Timer(0.5, other.release)
    timer.start()
    try:
        assert len(flush.commit(tier=mem_tier)) == 12
        assert not timer.is_alive()   # the commit waited for the other run's lock
    finally:
        timer.cancel()
    assert on_bfs(newer) == newer
    assert _leftovers(mem_tier.bfs_root) == []


def test_the_engine_serves_queued_syncs_in_a_row_as_one_commit(mem_tier, monkeypatch, caplog):
    import logging

    from mpiburst import engine, flush
    from mpiburst.flush import writes

    files = _files(mem_tier, 6)
    paths = sorted(files)
    for path in paths[:3]:
        mpiburst.sync(path, tier=mem_tier, block=False)
    flush.enqueue(mem_tier, "sync", os.path.join(mem_tier.bfs_root, "missing"))
    flush.enqueue(mem_tier, "prestage", os.path.join(mem_tier.bfs_root, "nothing-to-stage"))   # ends the row
    for path in paths[3:]:
        mpiburst.sync(path, tier=mem_tier, block=False)
    commits: list[list[str]] = []
    real_commit = flush.commit
    monkeypatch.setattr(flush, "commit", lambda paths, **kw: commits.append(paths) or real_commit(paths, **kw))
    bad = paths[4]

    def broken(path: str, offset: int, length: int) -> None:
        if path == bad:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(writes, "write_observers", [broken])
    eng = engine.Engine(mem_tier, logging.getLogger("test.engine"))
    with caplog.at_level(logging.INFO, logger="test.engine"):
        eng.serve_queue()
    assert commits == [[*paths[:3], os.path.join(mem_tier.bfs_root, "missing")], paths[3:]]
    assert "missing is not in the tier" in caplog.text
    assert "syncing them one by one" in caplog.text   # the second row failed together: one file kept none back
    assert on_bfs(files) == {p: files[p] for p in paths if p != bad}
    assert [m.path for m in mpiburst.residency.ls(tier=mem_tier) if m.dirty] == [bad]
    events = [e["path"] for e in mem_tier.store.stats()[1] if e.get("kind") == "sync"]
    assert sorted(events) == sorted(p for p in paths if p != bad)


def test_a_commit_preparing_files_for_longer_than_a_lease_keeps_every_lease(mem_tier, monkeypatch):
    """Found by 10,000 files on a loaded machine: the leases taken first expired before the last file was ready."""
    import time

    from mpiburst import flush
    from mpiburst.flush import snapshot

    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "2")
    monkeypatch.setattr(snapshot, "LEASE_SECONDS", 0.5)
    files = _files(mem_tier, 12)
    real_prepare = snapshot.prepare

    def slow(*args, **kwargs):
        plan = real_prepare(*args, **kwargs)
        time.sleep(0.15)   # 12 files in 2 threads: about 0.9 s of preparing, past the first leases
        return plan

    monkeypatch.setattr(snapshot, "prepare", slow)
    assert len(flush.commit(tier=mem_tier)) == 12
    assert on_bfs(files) == files


def test_the_lease_keeper_renews_each_lease_once_a_quarter_lease_not_every_round(monkeypatch):
    """Found by 10,000 files: renewing every held lease every round grew with files x duration; now each lease
    is renewed only when a quarter of it has passed, and none is lost; a round's renewals are one store call."""
    import time

    from mpiburst.flush import many, snapshot
    from mpiburst.store.memory import MemoryStore

    monkeypatch.setattr(snapshot, "LEASE_SECONDS", 0.4)   # rounds every 0.05 s, a renewal due after 0.1 s
    store = MemoryStore()
    renewals: dict[str, list[float]] = {}
    real_renew = store.renew

    def renew(path: str, token: str, seconds: float) -> bool:
        renewals.setdefault(path, []).append(time.monotonic())
        return real_renew(path, token, seconds)

    rounds: list[int] = []
    real_many = store.renew_many

    def renew_many(leases, seconds):   # noqa: ANN001, ANN202 - a spy: the real call, its size noted
        rounds.append(len(leases))
        return real_many(leases, seconds)

    monkeypatch.setattr(store, "renew", renew)
    monkeypatch.setattr(store, "renew_many", renew_many)
    keeper = many._LeaseKeeper(store)
    paths = [f"/bfs/f{i}" for i in range(50)]
    for path in paths:
        store.create(path, None)
        token = store.lease(path, 0.4)
        assert token is not None
        keeper.hold(path, token, time.monotonic())
    time.sleep(1.0)
    keeper.stop()
    keeper.check()                                            # no lease lost
    assert all(store.leased(p) for p in paths)
    assert set(renewals) == set(paths)                        # every lease renewed...
    gaps = [b - a for times in renewals.values() for a, b in zip(times, times[1:])]
    assert min(gaps, default=1.0) >= 0.1 - 0.01               # ...at most once a quarter lease (it was every round)
    assert sum(rounds) == sum(map(len, renewals.values()))    # every renewal in a round's one call, not one call each
    assert len(rounds) <= 1.0 / 0.05 < sum(rounds)           # at most one call a round (every 0.05 s)


# ----------------------------------------------------------------------------- a create does not look at the BFS

#: A file on the BFS before the run, longer than what the tier gets of it.
OLD = bytes(range(256)) * 40
#: What the tier writes over its start.
NEW = b"new"


def _unlooked(tier: Any, name: str) -> str:
    """Put :data:`OLD` on the BFS at ``name``, open it with ``MODE_CREATE``, write :data:`NEW` at 0, close it.

    Returns its BFS path; the open looked up neither the file nor its size.
    """
    path = os.path.join(tier.bfs_root, name)
    with open(path, "wb") as f:
        f.write(OLD)
    _one_file(f"burst://{name}", np.frombuffer(NEW, dtype=np.uint8))
    assert tier.store.meta(path).unlooked
    return path


def test_an_open_with_mode_create_does_not_look_the_file_up_on_the_bfs(mem_tier, monkeypatch):
    counting = Counting(mem_tier.store)
    mem_tier.store = counting
    os.makedirs(os.path.join(mem_tier.bfs_root, "d"))
    resolve("burst://d", mem_tier.bfs_root)   # the root's own resolution, once per process
    looked: list[str] = []
    for name in ("lstat", "stat"):
        real: Callable[..., os.stat_result] = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, real=real, **k: looked.append(str(p)) or real(p, *a, **k))
    _one_file("burst://d/f", np.zeros(10, dtype=np.uint8))
    monkeypatch.undo()
    path = os.path.join(mem_tier.bfs_root, "d", "f")
    assert path not in looked and looked == [os.path.join(mem_tier.bfs_root, "d")]   # its directory only
    assert not {"create", "meta", "found_on_bfs"} & set(counting.calls)   # the record went with the batch
    with pytest.raises(MPI.Exception) as err:   # an exclusive create still looks
        mpiburst.File.Open(MPI.COMM_SELF, "burst://d/f", MPI.MODE_WRONLY | MPI.MODE_CREATE | MPI.MODE_EXCL)
    assert err.value.Get_error_class() == MPI.ERR_FILE_EXISTS
    with open(os.path.join(mem_tier.bfs_root, "d", "bfs-only"), "wb") as f:
        f.write(b"x")
    with pytest.raises(MPI.Exception) as err:
        mpiburst.File.Open(MPI.COMM_SELF, "burst://d/bfs-only", MPI.MODE_WRONLY | MPI.MODE_CREATE | MPI.MODE_EXCL)
    assert err.value.Get_error_class() == MPI.ERR_FILE_EXISTS


def _first_need(tier: Any, path: str, url: str, first: str) -> bytes:
    """Do ``first``, the first thing that needs the unlooked file's size; check what it saw; return the bytes due."""
    rdonly, wronly = MPI.MODE_RDONLY, MPI.MODE_WRONLY
    if first == "Get_size":
        with mpiburst.File.Open(MPI.COMM_SELF, url, rdonly) as f:
            assert f.Get_size() == len(OLD)
    elif first == "Read_at":
        buf = bytearray(1000)
        with mpiburst.File.Open(MPI.COMM_SELF, url, rdonly) as f:
            f.Read_at(5000, buf)   # past what the tier holds
        assert bytes(buf) == OLD[5000:6000]
    elif first == "MODE_APPEND":
        with mpiburst.File.Open(MPI.COMM_SELF, url, wronly | MPI.MODE_APPEND) as f:
            assert f.Get_position() == len(OLD)
            f.Write(b"end")
        return NEW + OLD[len(NEW):] + b"end"
    elif first == "Set_size":
        with mpiburst.File.Open(MPI.COMM_SELF, url, wronly) as f:
            f.Set_size(4000)   # a truncation of bytes only the BFS holds
            assert f.Get_size() == 4000
        return (NEW + OLD[len(NEW):])[:4000]
    elif first == "stat":
        assert mpiburst.residency.stat(url, tier=tier)["size"] == len(OLD)
    elif first == "ls":
        assert [m.size for m in mpiburst.residency.ls(url, tier=tier)] == [len(OLD)]
    elif first == "sync":
        mpiburst.flush.sync(path, tier=tier)
    elif first == "mpiburst.open":
        assert mpiburst.open(url, "rb", tier=tier).read() == NEW + OLD[len(NEW):]
    return NEW + OLD[len(NEW):]


@pytest.mark.parametrize("first", ["Get_size", "Read_at", "MODE_APPEND", "Set_size", "stat", "ls", "sync",
                                   "mpiburst.open", "commit"])
def test_a_file_opened_unlooked_shows_the_bfs_bytes_to_whatever_first_needs_its_size(mem_tier, first):
    os.makedirs(os.path.join(mem_tier.bfs_root, "ckpt"))
    path = _unlooked(mem_tier, "ckpt/f")
    due = _first_need(mem_tier, path, "burst://ckpt/f", first)
    mpiburst.flush.commit(tier=mem_tier)
    with open(path, "rb") as f:
        assert f.read() == due
    meta = mem_tier.store.meta(path)
    assert not meta.unlooked and meta.size == len(due) and not meta.dirty
    assert mpiburst.open("burst://ckpt/f", "rb", tier=mem_tier).read() == due


def test_a_file_opened_unlooked_over_a_symlink_is_never_followed(mem_tier, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(OLD)
    os.symlink(outside, os.path.join(mem_tier.bfs_root, "link"))
    _one_file("burst://link", np.frombuffer(NEW, dtype=np.uint8))
    with mpiburst.File.Open(MPI.COMM_SELF, "burst://link", MPI.MODE_RDWR | MPI.MODE_CREATE) as f:
        with pytest.raises(mpiburst.PathError, match="symbolic link"):   # its size would be the outside file's
            f.Get_size()
        with pytest.raises(mpiburst.PathError, match="symbolic link"):
            f.Read_at(100, bytearray(10))
    with pytest.raises(mpiburst.PathError, match="outside the run's BFS root"):   # a lookup resolves the link
        mpiburst.File.Open(MPI.COMM_SELF, "burst://link", MPI.MODE_RDONLY)
    with pytest.raises(mpiburst.FlushError, match="not a regular file"):
        mpiburst.flush.commit(tier=mem_tier)
    assert outside.read_bytes() == OLD and os.path.islink(os.path.join(mem_tier.bfs_root, "link"))


@pytest.mark.timeout(60)
def test_another_process_sees_the_bfs_bytes_of_a_file_opened_unlooked(tier):
    """On a real server: a second process reads the whole file; what it found is recorded once, for all."""
    os.makedirs(os.path.join(tier.bfs_root, "ckpt"))
    path = _unlooked(tier, "ckpt/f")
    code = ("import sys, mpiburst; from mpiburst.tier import Tier; "
            "sys.stdout.buffer.write(mpiburst.open(sys.argv[2], 'rb', tier=Tier.connect(conf=sys.argv[1])).read())")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seen = subprocess.run([sys.executable, "-c", code, tier.conf.path, "burst://ckpt/f"], capture_output=True,
                          check=True, env=env, timeout=60).stdout
    assert seen == NEW + OLD[len(NEW):]
    meta = tier.store.meta(path)
    assert not meta.unlooked and meta.size == len(OLD)
    mpiburst.flush.commit(tier=tier)
    with open(path, "rb") as f:
        assert f.read() == seen


# ----------------------------------------------------------------------------- a new file's record, sent with its data

def _open_new(url: str) -> Any:
    return mpiburst.File.Open(MPI.COMM_SELF, url, MPI.MODE_RDWR | MPI.MODE_CREATE)


def test_a_new_file_is_in_the_tier_from_its_first_batch_and_this_process_sees_it_from_its_open(mem_tier):
    """Another process (the store asked directly) sees the file once its data or its Close went out."""
    store, bfs = mem_tier.store, mem_tier.bfs_root
    f = _open_new("burst://d/a")
    path = os.path.join(bfs, "d", "a")
    assert store.meta(path) is None                     # nothing sent at the Open
    f.Write_at(0, b"abc")
    assert store.meta(path) is None                     # buffered
    f.Close()
    meta = store.meta(path)
    assert (meta.size, meta.writers, meta.unlooked) == (3, 0, True)
    # this process asks about its own open file by name: the record goes out first, the handle counted in
    f = _open_new("burst://d/b")
    f.Write_at(0, b"xy")
    assert mpiburst.residency.stat("burst://d/b", tier=mem_tier)["size"] == 0   # the record, not the buffered data
    assert store.meta(os.path.join(bfs, "d", "b")).writers == 1
    with mpiburst.File.Open(MPI.COMM_SELF, "burst://d/b", MPI.MODE_RDONLY) as other:   # no ERR_NO_SUCH_FILE
        assert other.Get_size() == 0
    f.Close()
    assert store.meta(os.path.join(bfs, "d", "b")).writers == 0
    assert mpiburst.open("burst://d/b", "rb", tier=mem_tier).read() == b"xy"
    # an Open and Close without a byte make an empty file; Get_size while open makes the record
    _open_new("burst://d/empty").Close()
    f = _open_new("burst://d/sized")
    assert f.Get_size() == 0 and store.meta(os.path.join(bfs, "d", "sized")).writers == 1
    f.Close()
    f = _open_new("burst://d/gone")
    mpiburst.File.Delete("burst://d/gone")              # this process's open file: found, deleted
    f.Close()                                            # with nothing written: nothing brings it back
    assert mpiburst.listdir("burst://d", tier=mem_tier) == ["a", "b", "empty", "sized"]
    assert [(m.size, m.writers) for m in mpiburst.residency.ls(tier=mem_tier)] == [(3, 0), (2, 0), (0, 0), (0, 0)]


def test_a_new_file_larger_than_the_buffer_sends_its_record_with_its_first_blob(mem_tier):
    counting = Counting(mem_tier.store)
    mem_tier.store = counting
    info = MPI.Info.Create()
    info.Set("mpiburst_wr_buffer", "64k")
    data = np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8)
    with mpiburst.File.Open(MPI.COMM_SELF, "burst://big", MPI.MODE_WRONLY | MPI.MODE_CREATE, info) as f:
        f.Write_at(0, data)
    info.Free()
    assert "create" not in counting.calls and counting.calls.count("writer.send") == 5
    meta = mem_tier.store.meta(resolve("burst://big", mem_tier.bfs_root))
    assert (meta.size, meta.writers) == (len(data), 0)
    assert mpiburst.open("burst://big", "rb", tier=mem_tier).read() == data.tobytes()


class _FullBeforeTheRecord:
    """A batch writer whose first batch finds the tier full before its record is made (``made`` False)."""

    def __init__(self, writer: Any) -> None:
        self._writer, self.made, self.full = writer, False, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def finish(self) -> int:
        if self.full:
            self.full = False
            self._writer.close()
            raise mpiburst.TierFullError("full")
        return self._writer.finish()


@pytest.mark.parametrize("record", ["made", "not made"])
def test_a_new_file_whose_close_finds_the_tier_full_makes_room_and_is_counted_once(tmp_path, monkeypatch, record):
    """The Close's batch takes the room-making path (with_room: the other file is flushed and purged); the
    record is made once (with the batch, or alone before it is sent again), the writer counted in and out once."""
    tier = Tier.memory(str(tmp_path), capacity=64 << 10, align=4096)
    with mpiburst.open("burst://other", "wb", tier=tier) as f:
        f.write(b"o" * (60 << 10))
    if record == "not made":
        real = tier.store.writer
        monkeypatch.setattr(tier.store, "writer", lambda: _FullBeforeTheRecord(real()))
    f = _open_new("burst://new")
    f.Write_at(0, b"n" * (8 << 10))
    f.Close()
    meta = tier.store.meta(resolve("burst://new", tier.bfs_root))
    assert (meta.size, meta.writers, meta.unlooked) == (8 << 10, 0, True)
    assert mpiburst.open("burst://new", "rb", tier=tier).read() == b"n" * (8 << 10)
    with open(os.path.join(tier.bfs_root, "other"), "rb") as g:   # flushed to make room
        assert g.read() == b"o" * (60 << 10)


@pytest.mark.timeout(60)
def test_a_new_small_file_costs_one_round_trip_on_the_server(tier, monkeypatch):
    """On a real server: Open, Write_at and Close of a new file send once (record, batch, counters) and read once."""
    import redis

    sent: list[int] = []
    real = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda self, command, *a, **k: sent.append(1) or real(self, command, *a, **k))
    data = np.arange(65536, dtype=np.uint8)
    os.makedirs(os.path.join(tier.bfs_root, "d"))
    _one_file("burst://d/warm", data)                   # loads the scripts once
    for i in range(3):
        sent.clear()
        _one_file(f"burst://d/f{i}", data)
        assert len(sent) == 1
    _one_file("burst://d/f0", data[:10])               # an existing record is kept: its size stays
    meta = tier.store.meta(os.path.join(tier.bfs_root, "d", "f0"))
    assert (meta.size, meta.writers, meta.unlooked, meta.umask) == (65536, 0, True, current_umask())
    assert mpiburst.open("burst://d/f1", "rb", tier=tier).read() == data.tobytes()
    counters = tier.store.stats()[0][os.path.join(tier.bfs_root, "d", "f1")]   # they went with the batch
    assert [c["write_bytes"] for c in counters.values()] == [65536]


def test_a_directory_found_missing_is_not_looked_up_again_for_a_second_by_creates(tmp_path, monkeypatch):
    """A network filesystem caches no missing name: each new file of a directory not on the BFS yet would pay a
    lookup. Creates (``look`` False) take it as missing for MISSING_TTL seconds; lookups of files still look."""
    from mpiburst import paths

    root = tmp_path / "root"
    root.mkdir()
    resolve("burst://x", str(root))   # the root's own resolution, once per process
    looked: list[str] = []
    real_lstat: Callable[..., os.stat_result] = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: looked.append(str(p)) or real_lstat(p, *a, **k))
    monkeypatch.setattr(paths, "_missing", {})
    missing = str(root / "out")
    for i in range(3):
        assert locate(f"burst://out/r0/f{i}", str(root), look=False) == (str(root / f"out/r0/f{i}"), None)
    assert looked == [missing]                      # once, not per file
    looked.clear()
    (root / "out" / "r0").mkdir(parents=True)
    (root / "out" / "r0" / "f0").write_bytes(b"x")
    assert locate("burst://out/r0/f1", str(root), look=False)[0] == str(root / "out/r0/f1")
    assert looked == []                             # within the time: still taken as missing
    monkeypatch.setattr(paths, "MISSING_TTL", 0.0)  # past it: looked up again, found, no longer missing
    assert locate("burst://out/r0/f1", str(root), look=False) == (str(root / "out/r0/f1"), None)
    assert looked == [missing, str(root / "out/r0")] and paths._missing == {}
    looked.clear()
    monkeypatch.setattr(paths, "MISSING_TTL", 1.0)
    (root / "gone").mkdir()
    locate("burst://gone/new/f", str(root), look=False)
    assert locate("burst://gone/new/f", str(root))[1] is None    # a lookup of a file looks, whatever was cached
    assert looked == [str(root / "gone"), str(root / "gone/new"), str(root / "gone"), str(root / "gone/new")]


@pytest.mark.timeout(60)
def test_a_process_may_hold_more_files_open_than_the_pool_has_connections(tier):
    """On a real server: 150 files open at once, each synced while open (redis-py's pool holds 100 connections)."""
    files = [_open_new(f"burst://many/f{i}") for i in range(150)]
    for i, f in enumerate(files):
        f.Write_at(0, bytes([i]) * 10)
        f.Sync()
    for f in files:
        f.Close()
    assert mpiburst.open("burst://many/f149", "rb", tier=tier).read() == bytes([149]) * 10


@pytest.mark.parametrize("amode", [MPI.MODE_CREATE, MPI.MODE_CREATE | MPI.MODE_EXCL], ids=["create", "excl"])
def test_an_empty_new_file_is_made_on_the_bfs_at_its_close_never_while_open(mem_tier, amode):
    """``File.Open`` with ``MODE_CREATE`` makes a file, even if nothing is written to it.

    Before, a new file closed with no byte written had a record that was
    not dirty (no write, no truncation), so no commit, sync or stage-out
    ever made it on the BFS: an application's empty marker or log file was
    missing after the job. It is made at the first flush after its Close,
    and never while a handle still writes it (an empty file under the name
    of a checkpoint being written would be a half-written one).
    """
    from mpiburst import flush, residency

    url = "burst://out/empty.dat"
    path = os.path.join(mem_tier.bfs_root, "out", "empty.dat")
    f = mpiburst.File.Open(MPI.COMM_SELF, url, MPI.MODE_WRONLY | amode)
    f.Get_size()                                    # the record is in the tier now, with no byte
    residency.auto_sync(mem_tier)                   # the engine's commit: settled states only
    assert not os.path.exists(path)
    f.Close()
    assert [r.path for r in flush.commit(tier=mem_tier)] == [path]
    assert os.path.getsize(path) == 0 and not mem_tier.store.meta(path).dirty
    assert flush.commit(tier=mem_tier) == []        # made once


def test_a_create_of_a_file_the_bfs_holds_closed_unwritten_leaves_it_as_it_is(mem_tier):
    """``MODE_CREATE`` on a file the BFS holds, closed with no byte written: the commit makes no copy of it."""
    from mpiburst import flush

    path = os.path.join(mem_tier.bfs_root, "kept.dat")
    with open(path, "wb") as f:
        f.write(b"K" * 5000)
    inode = os.stat(path).st_ino
    f = mpiburst.File.Open(MPI.COMM_SELF, "burst://kept.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    f.Close()
    assert flush.commit(tier=mem_tier) == []
    assert os.stat(path).st_ino == inode and on_bfs({path: b""}) == {path: b"K" * 5000}
    assert not mem_tier.store.meta(path).dirty      # the commit learned the BFS holds it
