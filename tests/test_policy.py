"""Policy files: parsing and matching (unit tests), and stage-in / stage-out with every keyword on a real server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpiburst import policy as policies
from mpiburst.writeback import TierFile
from mpiburst.errors import PathError, PolicyError

# The server is this file's medium, not its subject: its tests run with the first engine only (docs/ci.md).
pytestmark = pytest.mark.workflow

ROOT = "/bfs"


# ----------------------------------------------------------------------------- parsing and matching (unit)

def test_parse_keywords_comments_and_blank_lines() -> None:
    p = policies.parse("# header\n\nIN in/mesh.h5\nsync results/   # keep\npurge ckpt/*.bin\nRETAIN scratch\n"
                       "DISCARD tmp/\n", "job.policy")
    assert [(r.keyword, r.pattern, r.line) for r in p.rules] == [
        ("IN", "in/mesh.h5", 3), ("SYNC", "results/", 4), ("PURGE", "ckpt/*.bin", 5),
        ("RETAIN", "scratch", 6), ("DISCARD", "tmp/", 7)]


def test_malformed_lines_are_all_reported_with_file_and_line() -> None:
    with pytest.raises(PolicyError) as info:
        policies.parse("SYNC a\nKEEP b\nPURGE\nDISCARD x y\nSYNC [ab\n", "bad.policy")
    msg = str(info.value)
    for where in ("bad.policy:2", "bad.policy:3", "bad.policy:4", "bad.policy:5"):
        assert where in msg
    assert "bad.policy:1" not in msg and "nothing was done" in msg


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        policies.load(tmp_path / "missing.policy")


@pytest.mark.parametrize("path, action", [
    ("/bfs/results/x.dat", "SYNC"),
    ("/bfs/results/deep/y.dat", "SYNC"),          # directories are recursive
    ("/bfs/ckpt/s1.bin", "PURGE"),                # glob
    ("/bfs/ckpt/s1.txt", "SYNC"),                 # no rule: default
    ("/bfs/scratch/a/b", "RETAIN"),
    ("/bfs/tmp/t", "DISCARD"),
    ("/bfs/results/tmp.keep", "RETAIN"),          # a later rule wins
    ("/bfs/run1/tmp/z", "DISCARD"),               # glob over a directory covers what is under it
    ("/bfs/other/file", "SYNC"),
])
def test_stage_out_action(path: str, action: str) -> None:
    p = policies.parse("SYNC results\nPURGE ckpt/*.bin\nRETAIN scratch/\nDISCARD tmp\nRETAIN results/*.keep\n"
                       "DISCARD run*/tmp\nIN other/file\n")
    assert p.action(path, ROOT) == action


def test_absolute_and_burst_patterns_and_command_line_lists() -> None:
    p = policies.parse("DISCARD /bfs/a\nPURGE burst://b/\n")
    assert p.action("/bfs/a/f", ROOT) == "DISCARD" and p.action("/bfs/b/f", ROOT) == "PURGE"
    p.extend("SYNC", ["a/keep,b"])
    assert p.action("/bfs/a/keep", ROOT) == "SYNC" and p.action("/bfs/b/f", ROOT) == "SYNC"
    assert p.action("/bfs/a/other", ROOT) == "DISCARD"
    with pytest.raises(PolicyError):
        p.extend("SYNC", ["a,,b"])


# ----------------------------------------------------------------------------- staging on a real server

def _write(tier, rel: str, data: bytes) -> str:
    path = os.path.join(tier.bfs_root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf = TierFile(tier, path, 0)
    tf.store.create(path, os.path.getsize(path) if os.path.exists(path) else None)
    tf.write(0, memoryview(data))
    tf.push()
    return path


@pytest.mark.timeout(120)
def test_stage_out_applies_every_keyword(cli, tier, tmp_path: Path) -> None:
    bfs = Path(tier.bfs_root)
    files = {rel: (rel.encode() * 1000) for rel in
             ("res/a.dat", "res/sub/b.dat", "ckpt/c1.bin", "scratch/s.dat", "tmp/t.dat", "plain.dat")}
    (bfs / "tmp").mkdir()
    (bfs / "tmp/t.dat").write_bytes(b"old")                 # DISCARD removes the BFS copy too
    for rel, data in files.items():
        _write(tier, rel, data)
    (tmp_path / "out.policy").write_text("SYNC res/\nPURGE ckpt/*.bin\nRETAIN scratch\nDISCARD tmp/\n")
    done = cli("stage-out", "--id", tier.id, "-f", "out.policy")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line.split()[0] for line in done.stdout.splitlines()}
    assert lines == {str(bfs / "res/a.dat"): "sync", str(bfs / "res/sub/b.dat"): "sync",
                     str(bfs / "ckpt/c1.bin"): "purge", str(bfs / "scratch/s.dat"): "retain",
                     str(bfs / "tmp/t.dat"): "discard", str(bfs / "plain.dat"): "sync"}
    store = tier.store
    for rel in ("res/a.dat", "res/sub/b.dat", "ckpt/c1.bin", "plain.dat"):
        assert (bfs / rel).read_bytes() == files[rel]
    assert not (bfs / "scratch/s.dat").exists() and store.meta(str(bfs / "scratch/s.dat")).dirty
    assert not (bfs / "tmp/t.dat").exists() and store.meta(str(bfs / "tmp/t.dat")) is None
    assert store.meta(str(bfs / "ckpt/c1.bin")) is None                 # purged: the tier holds nothing of it
    assert not store.meta(str(bfs / "res/a.dat")).dirty                 # synced and kept
    assert store.blobs(str(bfs / "res/a.dat"))

    # -d on the command line wins over the file; PATH limits the files
    done = cli("stage-out", "--id", tier.id, "-f", "out.policy", "-d", "scratch", str(bfs / "scratch"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "discard" and store.meta(str(bfs / "scratch/s.dat")) is None


@pytest.mark.timeout(120)
def test_stage_in_prestages_paths_and_in_rules(cli, tier, tmp_path: Path) -> None:
    bfs = Path(tier.bfs_root)
    (bfs / "in/tables").mkdir(parents=True)
    for rel in ("in/mesh.h5", "in/tables/t1", "in/tables/t2", "in/skip.txt", "extra.dat"):
        (bfs / rel).write_bytes(rel.encode() * 300)
    (tmp_path / "in.policy").write_text("IN in/mesh.h5\nIN in/tables/\nIN in/*.h5\n")
    done = cli("stage-in", "--id", tier.id, "-f", "in.policy", str(bfs / "extra.dat"))
    assert done.returncode == 0, done.stderr
    staged = sorted(line.split()[1] for line in done.stdout.splitlines())
    assert staged == sorted(str(bfs / r) for r in ("in/mesh.h5", "in/tables/t1", "in/tables/t2", "extra.dat"))
    store = tier.store
    for rel in ("in/mesh.h5", "in/tables/t1", "extra.dat"):
        meta = store.meta(str(bfs / rel))
        assert meta is not None and not meta.dirty and sum(b[3] for b in store.blobs(str(bfs / rel), 0, 0)) == \
            len(rel.encode() * 300)
    assert store.meta(str(bfs / "in/skip.txt")) is None


@pytest.mark.timeout(60)
def test_stage_in_of_a_missing_input_does_nothing(cli, tier, tmp_path: Path) -> None:
    bfs = Path(tier.bfs_root)
    (bfs / "present").write_bytes(b"x")
    (tmp_path / "in.policy").write_text("IN present\nIN absent/*.dat\n")
    done = cli("stage-in", "--id", tier.id, "-f", "in.policy")
    assert done.returncode == PathError.exit_code
    assert "in.policy:2" in done.stderr and "Traceback" not in done.stderr
    assert tier.store.meta(str(bfs / "present")) is None


@pytest.mark.timeout(60)
def test_stage_out_bad_policy_changes_nothing(cli, tier, tmp_path: Path) -> None:
    path = _write(tier, "keep.dat", b"k" * 100)
    (tmp_path / "bad.policy").write_text("DISCARD keep.dat\nSYNK x\n")
    done = cli("stage-out", "--id", tier.id, "-f", "bad.policy")
    assert done.returncode == PolicyError.exit_code and "bad.policy:2" in done.stderr
    assert tier.store.meta(path).dirty and not os.path.exists(path)
