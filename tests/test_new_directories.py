"""A commit's new directories (#25): staged whole, published by one rename, completed or rolled back after a kill.

Unit tests on the memory store (the tier's part is the Store interface;
what is tested is what the commit does on a real local filesystem). The
modes and ACLs of staged directories: tests/test_bfs_perms.py (``commit``).
"""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
from conftest import on_bfs

import mpiburst
from mpiburst import flush
from mpiburst.flush import newdirs, writes
from mpiburst.paths import resolve


def _files(tier, top: str = "step", n: int = 12) -> dict[str, bytes]:
    """Write ``n`` files under ``burst://<top>/r<i % 3>/``; return BFS path -> bytes."""
    rng = np.random.default_rng(n)
    out = {}
    for i in range(n):
        data = rng.integers(0, 256, int(rng.choice([1, 4096, 70_001])), dtype=np.uint8).tobytes()
        url = f"burst://{top}/r{i % 3}/f{i}"
        with mpiburst.open(url, "wb", tier=tier) as f:
            f.write(data)
        out[resolve(url, tier.bfs_root)] = data
    return out


def _leftovers(root: str) -> list[str]:
    return [os.path.join(d, n) for d, subdirs, names in os.walk(root) for n in names + subdirs if ".mpiburst" in n]


def _renames(monkeypatch) -> list[str]:
    """Record the target of every rename (plain, or without replacing) made from now on, but the journal's."""
    done: list[str] = []
    real_rename, real_noreplace = os.rename, newdirs.rename_noreplace

    def rename(src, dst, *args, **kwargs):
        if ".mpiburst-commit-" not in os.fspath(dst):
            done.append(os.fspath(dst))
        return real_rename(src, dst, *args, **kwargs)

    def noreplace(src, dst):
        done.append(dst)
        return real_noreplace(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(newdirs, "rename_noreplace", noreplace)
    return done


def test_a_new_directory_is_published_by_one_rename_whole_or_not_at_all(mem_tier, monkeypatch):
    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier)
    top = os.path.join(mem_tier.bfs_root, "step")
    seen: list[bool] = []
    monkeypatch.setattr(writes, "write_observers", [lambda *_: seen.append(os.path.lexists(top))])
    renames = _renames(monkeypatch)
    assert len(flush.commit(tier=mem_tier)) == 12
    assert seen and not any(seen)            # nothing of it visible while its files were written
    assert renames == [top]                  # 12 files in 3 new directories: one rename
    assert on_bfs(files) == files
    assert not any(m.dirty for m in mpiburst.residency.ls(tier=mem_tier))
    assert _leftovers(mem_tier.bfs_root) == []


def test_a_commit_failing_between_staging_and_publishing_is_completed_by_the_next_sync(mem_tier, monkeypatch):
    """The journal names the staging directory: the next sync's recovery publishes it with the other files."""
    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    old = _files(mem_tier, "old", 3)
    flush.commit(tier=mem_tier)
    files = {**_files(mem_tier), **{p: b"v2" + d for p, d in old.items()}}
    for path in old:
        with mpiburst.open(path, "wb", tier=mem_tier) as f:
            f.write(files[path])
    top = os.path.join(mem_tier.bfs_root, "step")
    real_noreplace, real_rename = newdirs.rename_noreplace, os.rename

    def refuse(src, dst, *args):
        if dst == top:
            raise OSError(errno.ENOSPC, "No space left on device")
        return (real_noreplace if not args else real_rename)(src, dst, *args)

    monkeypatch.setattr(newdirs, "rename_noreplace", refuse)
    monkeypatch.setattr(os, "rename", lambda s, d: refuse(s, d, 0) if d == top else real_rename(s, d))
    with pytest.raises(mpiburst.FlushError, match="while publishing them.*the next sync or commit completes it"):
        flush.commit(tier=mem_tier)
    assert not os.path.lexists(top)
    monkeypatch.setattr(newdirs, "rename_noreplace", real_noreplace)
    monkeypatch.setattr(os, "rename", real_rename)
    with mpiburst.open("burst://other", "wb", tier=mem_tier) as f:
        f.write(b"x")
    flush.sync("burst://other", tier=mem_tier)   # recovers the journal before it starts
    assert on_bfs(files) == files
    assert _leftovers(mem_tier.bfs_root) == []


def test_a_staging_directory_a_killed_commit_left_is_removed_by_the_next(mem_tier, monkeypatch):
    """Killed before its journal: nothing visible; the next commit of that directory removes the staging directory."""
    files = _files(mem_tier)
    dead = os.path.join(mem_tier.bfs_root, ".step.mpiburst-stage-0123456789abcdef")
    os.makedirs(os.path.join(dead, "r0"))
    with open(os.path.join(dead, "r0", "f0"), "wb") as f:
        f.write(b"half")
    assert len(flush.commit(tier=mem_tier)) == 12
    assert on_bfs(files) == files
    assert _leftovers(mem_tier.bfs_root) == []


@pytest.mark.parametrize("noreplace", ["taken", "refused"], ids=["renameat2", "without-renameat2"])
@pytest.mark.parametrize("holding", [False, True], ids=["empty", "holding-a-file"])
def test_a_directory_made_meanwhile_is_merged_into_never_replaced(mem_tier, monkeypatch, noreplace, holding):
    """``rename(2)`` replaces an empty directory: the commit moves its files into one made by someone else instead."""
    monkeypatch.setenv("MPIBURST_COMMIT_THREADS", "4")
    files = _files(mem_tier)
    top = os.path.join(mem_tier.bfs_root, "step")
    if noreplace == "refused":   # as on GlusterFS: the commit claims the name with mkdir, then renames over its claim
        def einval(src, dst):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(newdirs, "rename_noreplace", einval)

    once = threading.Lock()

    def someone(*_):
        with once:   # the commit writes from several threads
            if os.path.lexists(top):
                return
            os.mkdir(top, 0o700)
            if holding:
                os.mkdir(os.path.join(top, "r1"), 0o700)
                with open(os.path.join(top, "r1", "theirs"), "wb") as f:
                    f.write(b"theirs")

    monkeypatch.setattr(writes, "write_observers", [someone])
    flush.commit(tier=mem_tier)
    assert on_bfs(files) == files
    assert os.stat(top).st_mode & 0o777 == 0o700            # theirs, not replaced by the staged one
    if holding:
        assert os.stat(os.path.join(top, "r1")).st_mode & 0o777 == 0o700
        assert open(os.path.join(top, "r1", "theirs"), "rb").read() == b"theirs"
    assert _leftovers(mem_tier.bfs_root) == []


def test_a_directory_made_after_the_cut_before_its_lock_turns_the_commit_per_file(mem_tier, monkeypatch):
    """Found made under its parent's lock: every rank gives up the attempt and rank 0 commits file by file."""
    files = _files(mem_tier)
    top = os.path.join(mem_tier.bfs_root, "step")
    real_lock = newdirs.lock_directories

    def lock(dirs, wait=None):
        if wait == 0:
            os.makedirs(top, exist_ok=True)
        return real_lock(dirs, wait)

    monkeypatch.setattr(newdirs, "lock_directories", lock)
    renames = _renames(monkeypatch)
    assert len(flush.commit(tier=mem_tier)) == 12
    assert sorted(renames) == sorted(files)               # each file renamed into place
    assert on_bfs(files) == files
    assert _leftovers(mem_tier.bfs_root) == []


def test_a_journal_naming_a_staging_directory_merges_it_if_its_name_was_made_since(mem_tier, monkeypatch):
    files = _files(mem_tier)
    top = os.path.join(mem_tier.bfs_root, "step")
    real_noreplace = newdirs.rename_noreplace

    def refuse(src, dst):
        if dst == top:
            raise OSError(errno.EIO, "Input/output error")
        return real_noreplace(src, dst)

    monkeypatch.setattr(newdirs, "rename_noreplace", refuse)
    with pytest.raises(mpiburst.FlushError, match="while publishing"):
        flush.commit(tier=mem_tier)
    monkeypatch.setattr(newdirs, "rename_noreplace", real_noreplace)
    os.makedirs(os.path.join(top, "r2"))
    with open(os.path.join(top, "r2", "f2"), "wb") as f:   # a stale file of the same name: replaced
        f.write(b"stale")
    assert flush.recover(mem_tier.bfs_root) == 1
    assert on_bfs(files) == files
    assert _leftovers(mem_tier.bfs_root) == []
