"""The residency commands of the ``mpiburst`` CLI against a real server: results, and one clear line on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from mpiburst import residency, server
from mpiburst.server import lifecycle

from conftest import cli_env

from conftest import bfs_file
from mpiburst.testing import Model, put

# The server is this file's medium, not its subject: its tests run with the first engine only (docs/ci.md).
pytestmark = [pytest.mark.workflow, pytest.mark.timeout(120)]


def _file(tier, name: str, size: int = 200_000) -> tuple[str, Model]:
    store = tier.store
    path = bfs_file(tier, name)
    store.create(path, None)
    model = Model()
    put(store, path, model, [(0, random.Random(size).randbytes(size))])
    return path, model


def _one_line_error(proc, code: int, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("mpiburst "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_sync_block_verbose_and_frag_stat_json(atier, cli):
    path, model = _file(atier, "out/a.dat")
    proc = cli("sync", "-b", "-V", "--id", atier.id, "burst://out/a.dat")
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(model.data).hexdigest() in proc.stdout
    assert "200000 bytes" in proc.stdout and "/s" in proc.stderr      # progress with bytes/s
    assert open(path, "rb").read() == bytes(model.data)
    proc = cli("frag-stat", "--json", "-r", "--id", atier.id, "burst://out")
    assert json.loads(proc.stdout) == dict(path=path, dirty=0, pending=0, clean=200_000, deletable=0)


def test_sync_non_blocking_is_served_by_the_engine(atier, cli):
    path, model = _file(atier, "q.dat")
    proc = cli("sync", "--id", atier.id, "burst://q.dat")
    assert proc.returncode == 0 and "no engine runs" not in proc.stderr
    assert residency.wait_clean(path, tier=atier, timeout=30)
    assert open(path, "rb").read() == bytes(model.data)


def test_sync_non_blocking_queues_and_warns_without_engine(atier, cli):
    lifecycle._end_engine(atier.conf)
    _file(atier, "q.dat")
    proc = cli("sync", "--id", atier.id, "burst://q.dat")
    assert proc.returncode == 0 and "no engine runs" in proc.stderr
    assert atier.store.queued() == 1


def test_purge_refuses_dirty_without_force_and_k_keeps_it(atier, cli):
    path, _ = _file(atier, "p.dat")
    _one_line_error(cli("purge", "--id", atier.id, path), 1, "--force")
    assert atier.store.meta(path).dirty
    assert cli("purge", "-k", "--id", atier.id, path).returncode == 0
    assert atier.store.meta(path).dirty
    proc = cli("purge", "--force", "--id", atier.id, path)
    assert proc.returncode == 0 and "freed" in proc.stdout
    assert atier.store.meta(path) is None


@pytest.mark.slow
def test_pin_ls_stat_cat_prestage_rm(atier, cli):
    path, model = _file(atier, "d/c.dat")
    assert cli("pin", "--id", atier.id, path).returncode == 0
    proc = cli("ls", "--id", atier.id)
    assert proc.stdout.split() == ["200000", "dirty,pinned", path]
    proc = cli("stat", "--json", "--id", atier.id, path)
    assert json.loads(proc.stdout)["pinned"] is True
    assert cli("unpin", "--id", atier.id, path).returncode == 0
    raw = subprocess.run([sys.executable, "-m", "mpiburst", "cat", "--id", atier.id, "burst://d/c.dat"],
                         cwd=atier.conf.dir,
                         env=cli_env(), capture_output=True, timeout=60).stdout
    assert raw == bytes(model.data)
    src = bfs_file(atier, "in.dat")
    with open(src, "wb") as f:
        f.write(b"s" * 70_000)
    proc = cli("prestage", "-b", "--id", atier.id, src)
    assert proc.returncode == 0 and "staged" in proc.stdout
    assert atier.store.meta(src) is not None
    assert cli("rm", "--id", atier.id, src).returncode == 0
    assert not os.path.exists(src) and atier.store.meta(src) is None
    os.makedirs(bfs_file(atier, "d/old"))   # rm -r of a directory: its tier files and the BFS tree
    assert cli("rm", "-r", "--id", atier.id, "burst://d").returncode == 0
    assert not os.path.exists(bfs_file(atier, "d")) and atier.store.meta(path) is None


@pytest.mark.parametrize("args,code,words", [
    (["sync", "-b", "burst://nothing"], 2, ["not in the tier"]),
    (["sync", "-b", "/etc/passwd"], 2, ["outside the run's BFS root"]),
    (["sync", "-b", "--workers", "0", "burst://x"], 1, ["--workers"]),
    (["purge", "burst://nothing"], 2, ["not in the tier"]),
    (["pin", "burst://nothing"], 2, ["neither in the tier nor on the BFS"]),
    (["unpin", "burst://"], 2, ["names no file"]),
    (["prestage", "-b", "burst://nothing"], 2, ["not a file on the BFS"]),
    (["frag-stat", "burst://nothing"], 2, ["not in the tier"]),
    (["stat", "burst://nothing"], 2, ["not in the tier"]),
    (["cat", "burst://nothing"], 2, ["not in the tier"]),
    (["rm", "burst://nothing"], 2, ["neither in the tier nor on the BFS"]),
    (["ls", "burst://nothing"], 1, ["holds no files"]),
    (["sync", "-b", "burst://dir"], 2, ["is a directory; add -r"]),
])
def test_bad_input_gives_one_line(module_tier, cli, args, code, words):
    """One run for all bad inputs: each is refused and changes nothing the next one meets."""
    os.makedirs(bfs_file(module_tier, "dir"), exist_ok=True)
    _one_line_error(cli(*args[:1], "--id", module_tier.id, *args[1:], cwd=module_tier.conf.dir), code, *words)


def test_unknown_run_gives_one_line(cli):
    _one_line_error(cli("frag-stat", "--id", "nosuchrun", "burst://x"), 2, "no run conf")
