"""Flush faults against a real server: a full BFS, a file-size limit, a killed flusher, the server stopped.

Each fault must leave the data dirty in the tier, say which file failed and why,
and a later sync must produce the identical file. A new file must never appear
under its final name half-written.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from mpiburst import flush
from mpiburst.errors import FlushError
from mpiburst.tier import Tier

from mpiburst.testing import Model, put
from conftest import ALIGN, bfs_file, cli_env, require_root

SIZE = 3 << 20


@pytest.fixture(autouse=True)
def _one_stripe_writes(monkeypatch):
    """One stripe per BFS write, so a fault can strike between many writes of a small file."""
    monkeypatch.setattr(flush.writes, "WRITE_SIZE", ALIGN)


def _dirty_file(tier, name: str, model: Model | None = None, seed: int = 0) -> tuple[str, Model]:
    store = tier.store
    path = bfs_file(tier, name)
    store.create(path, len(model.data) if model else None)
    model = model or Model()
    rnd = random.Random(seed)
    put(store, path, model, [(o, rnd.randbytes(100_000)) for o in range(0, SIZE, 100_000)])
    return path, model


def _assert_still_dirty(tier, path: str) -> None:
    meta = tier.store.meta(path)
    assert meta.dirty and meta.clean == 0 and meta.pending == 0
    assert not tier.store.leased(path)


def _mounted_tmpfs(where: str, size: str) -> bool:
    os.makedirs(where, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                          capture_output=True).returncode == 0


@pytest.mark.timeout(60)
def test_enospc_on_a_full_filesystem(tmp_path, server_binary):
    """A 4 MiB tmpfs as the BFS, 2 MiB taken by another file: ENOSPC mid-flush, then a retry after space is freed."""
    require_root("mounting a small tmpfs (the RLIMIT_FSIZE test covers the rest)")   # CI: a failure, never a skip
    mnt = str(tmp_path / "small")
    assert _mounted_tmpfs(mnt, "4m")
    try:
        with open(os.path.join(mnt, "filler"), "wb") as f:
            f.write(bytes(2 << 20))
        with Tier.start(id=f"enospc{os.getpid()}", dir=str(tmp_path), bfs_root=mnt, capacity="128M",
                        server=server_binary, align="64K") as tier:
            path, model = _dirty_file(tier, "out.dat")
            with pytest.raises(FlushError, match=r"sync of .*out\.dat failed: No space left on device \[ENOSPC\]"):
                flush.sync(path, tier=tier)
            _assert_still_dirty(tier, path)
            assert sorted(os.listdir(mnt)) == ["filler"]      # no half file, no temp file left
            os.unlink(os.path.join(mnt, "filler"))
            flush.sync(path, tier=tier)
            assert open(path, "rb").read() == bytes(model.data)
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


@pytest.mark.timeout(60)
def test_file_size_limit_in_a_cli_flusher(atier, tmp_path):
    """``mpiburst sync -b`` under RLIMIT_FSIZE (SIGXFSZ ignored) fails with EFBIG in one line; a retry completes."""
    import resource

    path, model = _dirty_file(atier, "limited.dat")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-m", "mpiburst", "sync", "-b", "--id", atier.id, path],
                          cwd=str(tmp_path), env=cli_env(), capture_output=True, text=True, timeout=60,
                          preexec_fn=limit)
    assert proc.returncode == FlushError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "limited.dat failed: File too large [EFBIG]" in lines[0], proc.stderr
    _assert_still_dirty(atier, path)
    assert not os.path.exists(path)
    flush.sync(path, tier=atier)
    assert open(path, "rb").read() == bytes(model.data)


_KILLABLE = """
import sys, time
from mpiburst import flush
from mpiburst.tier import Tier
flush.snapshot.LEASE_SECONDS = 2.0
flush.writes.WRITE_SIZE = 1  # one stripe per write
count = []
def slow(path, off, n):
    count.append(n)
    if len(count) == 5:
        print("MID", flush=True)
        time.sleep(60)
flush.writes.write_observers.append(slow)
flush.sync(sys.argv[1], tier=Tier.connect(conf=sys.argv[2]))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
def test_flusher_killed_mid_flush(atier, existing, monkeypatch):
    """SIGKILL after 5 stripes: data stays dirty, the final name holds the old file or nothing; a second sync completes."""
    original = Model(random.Random(9).randbytes(SIZE + 12345)) if existing else None
    name = "killed.dat"
    if existing:
        with open(bfs_file(atier, name), "wb") as f:
            f.write(original.data)
    before = bytes(original.data) if existing else None
    path, model = _dirty_file(atier, name, original, seed=1)
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, path, atier.conf.path], env=cli_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MID"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    meta = atier.store.meta(path)
    assert meta.dirty and meta.clean == 0
    if existing:
        assert open(path, "rb").read() == before          # the old version, whole: never half new, half old
        assert any(".killed.dat.mpiburst-" in n for n in os.listdir(os.path.dirname(path)))
    else:
        assert not os.path.exists(path)
        assert any(".killed.dat.mpiburst-" in n for n in os.listdir(os.path.dirname(path)))
    monkeypatch.setattr(flush.snapshot, "LEASE_WAIT", 10.0)
    started = time.monotonic()
    flush.sync(path, tier=atier)                         # waits for the dead flusher's lease to expire
    assert time.monotonic() - started < 10
    assert open(path, "rb").read() == bytes(model.data)
    assert os.listdir(os.path.dirname(path)) == [name]   # the stale temp file was removed


@pytest.mark.timeout(90)
def test_server_stopped_mid_flush(tmp_path, server_binary, monkeypatch):
    """The server is saved and stopped during a flush: FlushError, data dirty after a restart, second sync completes."""
    monkeypatch.setattr(flush.snapshot, "LEASE_SECONDS", 2.0)
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    run = dict(id=f"stop{os.getpid()}", dir=str(tmp_path), server=server_binary)
    tier = Tier.start(bfs_root=str(bfs), capacity="128M", align="64K", **run)
    try:
        path, model = _dirty_file(tier, "out.dat")
        seen = []

        def stop_server(p, off, n):
            seen.append(n)
            if len(seen) == 3:
                tier.stop(save=True)

        flush.writes.write_observers.append(stop_server)
        try:
            with pytest.raises(FlushError, match="connection to the tier's server was lost"):
                flush.sync(path, tier=tier)
        finally:
            flush.writes.write_observers.clear()
        assert not os.path.exists(path)
        tier = Tier.start(restart=True, **run)
        meta = tier.store.meta(path)              # the snapshot survived the restart: nothing lost
        assert meta.dirty and meta.clean == 0
        flush.sync(path, tier=tier)
        assert open(path, "rb").read() == bytes(model.data)
    finally:
        tier.stop()
