"""Files and directories the flush makes on the BFS get what a direct write would have given them.

Each test writes through the tier under the application's umask, flushes
under another umask (the engine or ``mpiburst run``'s commit may flush, with
their own umask), and compares the result with a direct ``open(O_CREAT, 0666)``
or ``mkdir(0777)`` by the application in the same directory. Real filesystem
attributes; what the flush does with them is a unit test on the memory store
(``mem_tier``: the writer's umask travels in the file's record, through the
``Store`` interface), and a real server where the server or a run is part of
the promise (its own files' modes, ``mpiburst run``'s stage-out, a split
retrieve, another user's file).
"""

from __future__ import annotations

import contextlib
import io
import glob
import os
import shlex
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

import mpiburst
from conftest import cli_env, processes_gone, require_root, require_tool
from mpiburst import flush, perms
from mpiburst.tier import Tier

NOBODY = 65534     # nobody / nogroup on Debian: an owner and group other than root's, as root


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def write_through(tier: Tier, rel: str, data: bytes, app_umask: int, mode: str = "wb") -> str:
    """Write ``data`` to ``burst://rel`` as an application with ``app_umask``; return the BFS path."""
    with umask(app_umask), mpiburst.open(f"burst://{rel}", mode, tier=tier) as f:
        f.write(data)
    return os.path.join(tier.bfs_root, rel)


def sync_as(tier: Tier, path: str, flusher_umask: int, how: str = "sync") -> None:
    """Flush ``path`` from a process whose umask is ``flusher_umask``: a sync, or a ``"commit"`` of it alone.

    A commit lists each directory once under its lock and opens each new version once (flush/many.py): the
    attributes it gives must be a sync's.
    """
    with umask(flusher_umask):
        if how == "commit":
            assert [r.path for r in flush.commit(tier=tier, select=lambda p: p == path)] == [path]
        else:
            flush.sync(path, tier=tier)


def direct_file(path: str, app_umask: int) -> os.stat_result:
    """What the application's own ``open(O_CREAT, 0666)`` gives ``path``."""
    with umask(app_umask):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return os.stat(path)


def direct_dirs(path: str, app_umask: int) -> None:
    with umask(app_umask):
        os.makedirs(path)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def acl(path: str, name: str = perms.ACCESS_ACL) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


@pytest.mark.parametrize("app_umask", [0o022, 0o027, 0o002, 0o077], ids=lambda m: f"app{m:03o}")
@pytest.mark.parametrize("flusher_umask", [0o077, 0o000], ids=lambda m: f"flusher{m:03o}")
def test_new_file_gets_the_applications_umask_not_the_flushers(mem_tier, app_umask, flusher_umask):
    """0666 & ~umask of the writer, whatever the umask of the process that flushes."""
    path = write_through(mem_tier, "new.dat", b"x" * 5000, app_umask)
    sync_as(mem_tier, path, flusher_umask)
    ref = direct_file(os.path.join(mem_tier.bfs_root, "direct.dat"), app_umask)
    assert mode(path) == stat.S_IMODE(ref.st_mode) == 0o666 & ~app_umask
    assert open(path, "rb").read() == b"x" * 5000


@pytest.mark.parametrize("how", ["sync", "commit"])
def test_directories_the_flush_creates_get_0777_and_not_umask(mem_tier, how):
    """Missing parents are made as the application's ``mkdir(0777)`` would make them (group-writable umask).

    A commit stages new directories and publishes them by one rename (flush/newdirs.py): the same modes.
    """
    path = write_through(mem_tier, "a/b/c.dat", b"data", 0o002)
    sync_as(mem_tier, path, 0o077, how)
    direct_dirs(os.path.join(mem_tier.bfs_root, "d/e"), 0o002)
    for flushed, direct in (("a", "d"), ("a/b", "d/e")):
        assert mode(os.path.join(mem_tier.bfs_root, flushed)) == mode(os.path.join(mem_tier.bfs_root, direct)) == 0o775
    assert mode(path) == 0o664


@pytest.mark.parametrize("how", ["sync", "commit"])
def test_private_while_written_and_final_mode_before_the_rename(mem_tier, monkeypatch, how):
    """The temporary file is 0600 while its bytes are written, and has its final mode when renamed into place."""
    path = write_through(mem_tier, "big.dat", os.urandom(3 * mem_tier.align + 100), 0o022)
    seen_writing, seen_renaming = [], []

    def observe(target, offset, length):
        seen_writing.extend(mode(p) for p in glob.glob(os.path.join(mem_tier.bfs_root, ".big.dat.mpiburst-*")))

    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if dst == path:
            seen_renaming.append(mode(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(flush.writes, "write_observers", [observe])
    monkeypatch.setattr(os, "rename", rename)
    sync_as(mem_tier, path, 0o077, how)
    assert seen_writing and set(seen_writing) == {0o600}
    assert seen_renaming == [0o644]
    assert mode(path) == 0o644


def test_a_file_of_a_new_directory_is_private_while_written_and_has_its_mode_before_the_directory_is_published(
        mem_tier, monkeypatch):
    """A commit writes the files of a new directory in a staging directory (flush/newdirs.py): the same modes."""
    path = write_through(mem_tier, "fresh/big.dat", os.urandom(3 * mem_tier.align + 100), 0o022)
    staged = os.path.join(mem_tier.bfs_root, ".fresh.mpiburst-stage-*", "big.dat")
    seen_writing, seen_renaming = [], []
    monkeypatch.setattr(flush.writes, "write_observers",
                        [lambda *_: seen_writing.extend(mode(p) for p in glob.glob(staged))])
    real = flush.newdirs.rename_noreplace

    def rename(src, dst):
        seen_renaming.append((dst, mode(os.path.join(src, "big.dat")), mode(src)))
        real(src, dst)

    monkeypatch.setattr(flush.newdirs, "rename_noreplace", rename)
    sync_as(mem_tier, path, 0o077, "commit")
    assert seen_writing and set(seen_writing) == {0o600}
    assert seen_renaming == [(os.path.dirname(path), 0o644, 0o755)]
    assert mode(path) == 0o644


@pytest.mark.parametrize("how", ["sync", "commit"])
def test_existing_file_keeps_mode_owner_and_group(mem_tier, how):
    """A flush that rewrites and truncates an existing file leaves its mode, owner and group alone."""
    path = os.path.join(mem_tier.bfs_root, "old.dat")
    Path(path).write_bytes(b"o" * 100_000)
    os.chmod(path, 0o640)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    before = os.stat(path)
    with umask(0o000), mpiburst.open(f"burst://old.dat", "r+b", tier=mem_tier) as f:
        f.seek(10)
        f.write(b"new")
        f.truncate(50_000)
    sync_as(mem_tier, path, 0o077, how)
    after = os.stat(path)
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == \
        (0o640, before.st_uid, before.st_gid)
    assert Path(path).read_bytes() == b"o" * 10 + b"new" + b"o" * (50_000 - 13)


def test_a_file_written_aside_takes_the_replaced_files_mode_owner_group_and_acl(tmp_path):
    """The attributes a flush that writes aside and renames gives its temporary file: all the old file's."""
    require_root("giving a file another owner")
    setfacl = require_tool("setfacl", "acl")
    target, aside = tmp_path / "f.dat", tmp_path / ".f.dat.mpiburst-x"
    target.write_bytes(b"old")
    os.chown(target, NOBODY, NOBODY)
    subprocess.run([setfacl, "-m", f"u:{NOBODY}:r,g::rw,o::-", str(target)], check=True, timeout=30)
    os.chmod(target, os.stat(target).st_mode | stat.S_ISGID)   # setgid on a file: must survive too
    with umask(0o077):
        perms.create_aside(str(aside))
    fd = os.open(aside, os.O_RDWR)
    try:
        perms.give_final_attrs(fd, str(target), 0o077)
    finally:
        os.close(fd)
    old, new = os.stat(target), os.stat(aside)
    assert (new.st_mode, new.st_uid, new.st_gid) == (old.st_mode, old.st_uid, old.st_gid)
    assert acl(str(aside)) == acl(str(target)) is not None


def _group_other_than_mine() -> int:
    """A group this process may give a directory: nogroup as root, else a supplementary group if any."""
    if os.geteuid() == 0:
        return NOBODY
    others = [g for g in os.getgroups() if g != os.getegid()]
    return others[0] if others else os.getegid()


@pytest.mark.parametrize("how", ["sync", "commit"])
def test_setgid_directory_gives_its_group_as_a_direct_write_does(mem_tier, how):
    """In a setgid directory the flushed file and the directories the flush makes inherit its group (and bit)."""
    shared = os.path.join(mem_tier.bfs_root, "project")
    os.mkdir(shared)
    os.chown(shared, -1, _group_other_than_mine())
    os.chmod(shared, 0o2775)
    path = write_through(mem_tier, "project/run1/out.dat", b"data", 0o002)
    sync_as(mem_tier, path, 0o077, how)
    ref_file = direct_file(os.path.join(shared, "direct.dat"), 0o002)
    direct_dirs(os.path.join(shared, "direct"), 0o002)
    made, ref_dir = os.stat(os.path.join(shared, "run1")), os.stat(os.path.join(shared, "direct"))
    assert (made.st_mode, made.st_gid) == (ref_dir.st_mode, ref_dir.st_gid)
    assert made.st_gid == os.stat(shared).st_gid and made.st_mode & stat.S_ISGID
    flushed = os.stat(path)
    assert (flushed.st_mode, flushed.st_gid) == (ref_file.st_mode, ref_file.st_gid)
    assert flushed.st_gid == os.stat(shared).st_gid


@pytest.mark.parametrize("how", ["sync", "commit"])
def test_default_acl_is_inherited_as_by_a_direct_write(mem_tier, how):
    """A default ACL decides the modes, not the umask: the flushed file and directory match direct ones."""
    setfacl = require_tool("setfacl", "acl")
    shared = os.path.join(mem_tier.bfs_root, "acl")
    os.mkdir(shared)
    subprocess.run([setfacl, "-d", "-m", f"u::rwx,g::rwx,o::r-x,u:{NOBODY}:rwx", shared], check=True, timeout=30)
    path = write_through(mem_tier, "acl/sub/out.dat", b"data", 0o077)   # a umask the default ACL overrides
    sync_as(mem_tier, path, 0o077, how)
    ref_file = direct_file(os.path.join(shared, "direct.dat"), 0o077)
    direct_dirs(os.path.join(shared, "direct"), 0o077)
    sub, ref_dir = os.path.join(shared, "sub"), os.path.join(shared, "direct")
    assert mode(sub) == mode(ref_dir) == 0o775
    assert acl(sub) == acl(ref_dir) is not None
    assert acl(sub, perms.DEFAULT_ACL) == acl(ref_dir, perms.DEFAULT_ACL) is not None
    assert mode(path) == stat.S_IMODE(ref_file.st_mode) == 0o664
    assert acl(path) == acl(os.path.join(shared, "direct.dat")) is not None


def test_tier_data_stays_private_whatever_the_umask(tmp_path, server_binary):
    """Run conf, server conf, log, sockets and snapshots stay 0600 / 0700 while the BFS file gets 0666."""
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    with umask(0o000):
        # a short id (tmp_path is this test's own): under pytest-xdist without --basetemp the socket path is near the 107 bytes allowed
        t = Tier.start(id="perm", dir=str(run), bfs_root=str(bfs), capacity="64M",
                       server=server_binary)
        try:
            path = write_through(t, "out.dat", b"data", 0o000)
            flush.sync(path, tier=t)
            running = {p: p.lstat().st_mode for p in run.rglob("*")}
        finally:
            t.stop(save=True)       # leaves a snapshot in the run directory
        stopped = {p: p.lstat().st_mode for p in run.rglob("*")}
    assert mode(path) == 0o666
    kinds = {stat.S_IFMT(m) for m in running.values()}
    assert {stat.S_IFSOCK, stat.S_IFREG, stat.S_IFDIR} <= kinds, running
    assert any(p.suffix == ".rdb" for p in stopped), stopped
    loose = [(str(p), oct(m)) for p, m in {**running, **stopped}.items() if stat.S_IMODE(m) & 0o077]
    assert not loose, f"tier data open to others: {loose}"


def test_h5py_file_through_the_tier_gets_the_mode_h5py_gives_directly(mem_tier):
    """``mpiburst.h5.File`` records the writing process's umask as ``mpiburst.open`` does."""
    import h5py
    import numpy as np

    from mpiburst import h5 as mh5

    with umask(0o027), mh5.File("burst://h5/fields.h5", "w", tier=mem_tier) as h:
        h["u"] = np.arange(10.0)
    path = os.path.join(mem_tier.bfs_root, "h5/fields.h5")
    sync_as(mem_tier, path, 0o077)
    with umask(0o027), h5py.File(os.path.join(mem_tier.bfs_root, "h5/direct.h5"), "w") as h:
        h["u"] = np.arange(10.0)
    assert mode(path) == mode(os.path.join(mem_tier.bfs_root, "h5/direct.h5")) == 0o640
    assert mode(os.path.join(mem_tier.bfs_root, "h5")) == 0o750


APP = textwrap.dedent("""\
    import sys
    import mpiburst
    with mpiburst.open("burst://proj/out.dat", "wb") as f:
        f.write(b"x" * 5000)
    sys.exit(int(sys.argv[1]))
    """)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ends", ["succeeds", "fails, then stage-out"])
def test_mpiburst_run_stage_out_applies_the_applications_umask_not_the_runs(tmp_path, server_binary, ends):
    """``mpiburst run`` (umask 077) of an application with umask 002: its commit, or a later
    ``mpiburst stage-out`` of the saved run (the umask kept in the snapshot), gives 0664 / 0775."""
    (tmp_path / "bfs").mkdir()
    (tmp_path / "app.py").write_text(APP)
    env = cli_env(MPIBURST_SERVER=server_binary)
    status = 0 if ends == "succeeds" else 3
    app = f"umask 002 && exec {shlex.quote(sys.executable)} app.py {status}"
    with umask(0o077):
        run = subprocess.run([sys.executable, "-m", "mpiburst", "run", "--id", "perm", "--bfs-root", "bfs",
                              "--capacity", "64M", "--", "sh", "-c", app],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == status, run.stderr
        if status:
            assert not (tmp_path / "bfs/proj").exists()        # retained in the tier's snapshot, not flushed
            out = subprocess.run([sys.executable, "-m", "mpiburst", "stage-out", "--id", "perm"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
    assert processes_gone(tmp_path)
    assert (tmp_path / "bfs/proj/out.dat").read_bytes() == b"x" * 5000
    direct_dirs(str(tmp_path / "bfs/ref"), 0o002)
    ref = direct_file(str(tmp_path / "bfs/ref/out.dat"), 0o002)
    assert mode(str(tmp_path / "bfs/proj/out.dat")) == stat.S_IMODE(ref.st_mode) == 0o664
    assert mode(str(tmp_path / "bfs/proj")) == mode(str(tmp_path / "bfs/ref")) == 0o775


@pytest.mark.timeout(120)
def test_channel_files_of_a_split_retrieve_get_the_retrievers_umask_and_keep_an_existing_files_mode(
        tmp_path, server_binary):
    """mem_io's ``retrieve -split`` wrote its files with fopen: ``0666 & ~umask``; an existing file keeps its mode."""
    from mpiburst import channels

    out = tmp_path / "split"
    out.mkdir()
    with umask(0o077), Tier.start(id="chperm", dir=str(tmp_path), capacity="64M", channels=2,
                                  server=server_binary) as tier:
        for c, data in ((0, b"zero" * 100), (1, b"one" * 100)):
            channels.store(tier, c, io.BytesIO(data))
        kept = out / f"data_{tier.id}_1.dat"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        with umask(0o002):
            paths = channels.split(tier, str(out))
    assert [os.path.basename(p) for p in paths] == [f"data_{tier.id}_0.dat", f"data_{tier.id}_1.dat"]
    ref = direct_file(str(out / "direct.dat"), 0o002)
    assert mode(paths[0]) == stat.S_IMODE(ref.st_mode) == 0o664
    assert mode(paths[1]) == 0o640 and kept.read_bytes() == b"one" * 100
    assert sorted(os.listdir(out)) == sorted(["direct.dat", *map(os.path.basename, paths)])   # no temporary left


FOREIGN = textwrap.dedent("""\
    import sys
    import mpiburst
    from mpiburst import flush
    from mpiburst.tier import Tier
    run, bfs, server = sys.argv[1:]
    with Tier.start(id="foreign", dir=run, bfs_root=bfs, capacity="64M", server=server) as t:
        for name in ("synced.dat", "committed.dat"):
            with mpiburst.open(f"burst://{name}", "r+b", tier=t) as f:
                f.seek(10)
                f.write(b"new")
                f.truncate(50_000)
        flush.sync(f"{bfs}/synced.dat", tier=t)
        assert [r.path for r in flush.commit(tier=t)] == [f"{bfs}/committed.dat"]
    """)


@pytest.mark.timeout(120)
def test_another_users_file_is_rewritten_in_place_as_a_direct_write_would(tmp_path, server_binary):
    """A flusher that may write another user's file but not give a new file that owner (no CAP_CHOWN:
    any non-root member of a shared project) rewrites it in place: inode, owner, group and mode stay."""
    require_root("giving a file another owner, and flushing it without CAP_CHOWN")
    (tmp_path / "run").mkdir()
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    before = {}
    for name in ("synced.dat", "committed.dat"):
        path = bfs / name
        path.write_bytes(b"o" * 100_000)
        os.chown(path, NOBODY, NOBODY)
        os.chmod(path, 0o664)               # a group-writable file of another member
        before[name] = os.stat(path)
    (tmp_path / "foreign.py").write_text(FOREIGN)
    done = subprocess.run(["setpriv", "--bounding-set", "-chown", "--inh-caps", "-chown", "--", sys.executable,
                           str(tmp_path / "foreign.py"), str(tmp_path / "run"), str(bfs), server_binary],
                          env=cli_env(), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    for name, old in before.items():
        new = os.stat(bfs / name)
        assert (new.st_ino, new.st_uid, new.st_gid, stat.S_IMODE(new.st_mode)) == \
            (old.st_ino, NOBODY, NOBODY, 0o664), name
        assert (bfs / name).read_bytes() == b"o" * 10 + b"new" + b"o" * (50_000 - 13)
    assert sorted(os.listdir(bfs)) == ["committed.dat", "synced.dat"]    # no new version or journal left
