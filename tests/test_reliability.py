"""Fault tests of docs/reliability.md with a real server (one process, subprocesses, real kills).

Each test names the promise it checks; docs/reliability.md lists them all.
MPI versions of some promises are in ``test_reliability_mpi.py``.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
import pytest
from mpi4py import MPI

import mpiburst
from mpiburst.writeback import MAX_OFFSET
from mpiburst.errors import OffsetError
from mpiburst.file import File
from mpiburst.tier import Tier

from conftest import cli_env, require_root

RW = MPI.MODE_RDWR | MPI.MODE_CREATE


def _mount_tmpfs(where, size: str) -> None:
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, timeout=30)


# ----------------------------------------------------------------------------- offsets (#13 item 4)

@pytest.mark.timeout(60)
def test_offsets_past_the_exact_limit_are_refused_everywhere(tier):
    """Promise: an offset the tier cannot store exactly is refused with OffsetError, never stored wrong."""
    for offset in (2**53 + 1, MAX_OFFSET - 4, 2**62, 2**63 - 10, 2**63 + 10):
        with mpiburst.open("burst://far.bin", "w+b", tier=tier) as f:
            f.seek(offset)
            with pytest.raises(OffsetError, match="only up to"):
                f.write(b"HELLO")
            with pytest.raises(OffsetError):
                f.truncate(offset + 5)
    fh = File.Open(MPI.COMM_SELF, "burst://far.dat", RW)
    try:
        with pytest.raises(OffsetError):
            fh.Write_at(2**53 + 1, b"HELLO")
        with pytest.raises(OffsetError):
            fh.Write_at_all(2**62, b"HELLO")
        with pytest.raises(OffsetError):
            fh.Set_size(2**63 - 1)
        assert fh.Get_size() == 0                  # nothing of the refused writes was stored
    finally:
        fh.Close()


@pytest.mark.timeout(60)
def test_offsets_up_to_the_limit_read_back_exact(tier):
    """Promise: every offset below the limit is exact (2**52 + 1 and the last 5 bytes the tier takes)."""
    fh = File.Open(MPI.COMM_SELF, "burst://edge.dat", RW)
    try:
        for offset in (2**52 + 1, 2**53 - 2**18 - 2**17 + 3, MAX_OFFSET - 5):
            fh.Write_at(offset, b"HELLO")
            fh.Sync()
            before, buf = bytearray(1), bytearray(5)
            fh.Read_at(offset - 1, before)
            fh.Read_at(offset, buf)
            assert (bytes(before), bytes(buf)) == (b"\0", b"HELLO"), offset
        assert fh.Get_size() == MAX_OFFSET
    finally:
        fh.Close()


_FAR_SYNC = """
import resource, sys
from mpiburst import flush
from mpiburst.tier import Tier
flush.sync(sys.argv[1], tier=Tier.connect(conf=sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offset", [2**52, MAX_OFFSET - 5], ids=["2**52", "limit"])
def test_sync_memory_does_not_grow_with_the_logical_size(tmp_path, server_binary, offset):
    """Promise: a sync plans stripes only around dirty data: a 5-byte write far out syncs in little memory.

    The flusher runs in a subprocess limited to 1 GiB of address space (the
    old planner allocated a list entry per 8 MiB of logical size: 12 GB at
    2**62); its peak RSS is reported, and the BFS file is sparse.
    """
    require_root("mounting a tmpfs BFS: a file of 2**52 bytes does not fit ext4 (16 TiB)")   # CI: a failure
    bfs = tmp_path / "bfs"
    _mount_tmpfs(bfs, "64m")
    try:
        with Tier.start(id=f"far{os.getpid()}", dir=str(tmp_path), bfs_root=str(bfs), capacity="64M",
                        server=server_binary) as t:
            with mpiburst.open("burst://sparse.bin", "wb", tier=t) as f:
                f.write(b"head")
                f.seek(offset)
                f.write(b"HELLO")
            path = str(bfs / "sparse.bin")

            def limit() -> None:
                resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

            proc = subprocess.run([sys.executable, "-c", _FAR_SYNC, path, t.conf.path], env=cli_env(),
                                  capture_output=True, text=True, timeout=100, preexec_fn=limit)
            assert proc.returncode == 0, proc.stderr[-2000:]
            peak_kib = int(proc.stdout.split()[-1])
            print(f"peak RSS of the sync of a 5-byte write at {offset}: {peak_kib / 1024:.0f} MiB")
            assert peak_kib < 256 << 10
            assert os.path.getsize(path) == offset + 5
            assert os.stat(path).st_blocks * 512 < 8 << 20      # the holes were not allocated
            with open(path, "rb") as fh:
                assert fh.read(4) == b"head"
                fh.seek(offset - 1)
                assert fh.read() == b"\0HELLO"
    finally:
        subprocess.run(["umount", "-l", str(bfs)], check=False, timeout=30)


# ----------------------------------------------------------------------------- torn files (#13 item 5)

_SLOW_SYNC = """
import sys, time
from mpiburst import flush
from mpiburst.tier import Tier
flush.writes.WRITE_SIZE = 1                 # one stripe per write call
delay = float(sys.argv[3])
def slow(p, o, n, seen=[]):
    if not seen:
        print("WRITING", flush=True)
    seen.append(n)
    time.sleep(delay)
flush.writes.write_observers.append(slow)
rep = flush.sync(sys.argv[1], tier=Tier.connect(conf=sys.argv[2]))
print("OK", rep.upto, flush=True)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pattern", ["whole", "halves"])
def test_concurrent_syncs_of_one_bfs_path_from_two_runs_are_serialised(tmp_path, server_binary, pattern):
    """Promise: two runs syncing one BFS path take turns; both succeed and the file is their serial result.

    ``whole``: each run rewrote every stripe (A's bytes, B's bytes), B's
    sync started while A's was writing: the file is entirely B's, never a
    mix. ``halves``: A rewrote the
    first half, B the second: both halves are there (no lost update).
    """
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    size = 40 << 16                  # 40 stripes of 64 KiB
    path = str(bfs / "shared.dat")
    with open(path, "wb") as f:
        f.write(b"o" * size)
    tiers = []
    for k in range(2):
        (tmp_path / f"run{k}").mkdir()
        tiers.append(Tier.start(id=f"r{k}{os.getpid()}", dir=str(tmp_path / f"run{k}"), bfs_root=str(bfs),
                                capacity="64M", server=server_binary, align="64K"))
    try:
        for k, t in enumerate(tiers):
            with mpiburst.open("burst://shared.dat", "r+b", tier=t) as f:
                if pattern == "whole":
                    f.write(b"AB"[k:k + 1] * size)
                else:
                    f.seek(k * size // 2)
                    f.write(b"AB"[k:k + 1] * (size // 2))
        # A writes slowly; B starts once A is writing and writes fast: unserialised, B overtakes A
        # midway and the file ends half B, half A.
        procs = [subprocess.Popen([sys.executable, "-c", _SLOW_SYNC, path, tiers[0].conf.path, "0.05"],
                                  env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        assert procs[0].stdout.readline().strip() == "WRITING"
        procs.append(subprocess.Popen([sys.executable, "-c", _SLOW_SYNC, path, tiers[1].conf.path, "0.005"],
                                      env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=150) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and out.split()[-2] == "OK", err[-2000:]
        data = open(path, "rb").read()
        assert len(data) == size
        if pattern == "whole":
            assert data == b"B" * size, f"mixed file: {data.count(b'A')} A, {data.count(b'B')} B"
        else:
            assert data == b"A" * (size // 2) + b"B" * (size // 2)
        assert sorted(os.listdir(bfs)) == ["shared.dat"]      # no temp or lock file left behind
    finally:
        for t in tiers:
            t.stop()


def test_opening_a_file_in_a_full_tier_makes_room(tmp_path, server_binary):
    """Promise: creating or truncating a file in a full tier flushes and frees data first, as a write does.

    The tier is filled to its last byte with dirty data through the store
    itself (no room made, the engine stopped). Opening a new file with "wb"
    then creates its record and truncates it: before the fix that was a
    TierFullError (seen in a writer loop that opened its next checkpoint
    while the tier was full), though the dirty data could be synced and freed.
    """
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    with Tier.start(id=f"full{os.getpid()}", dir=str(tmp_path), bfs_root=str(bfs), capacity="16M",
                    server=server_binary) as t:
        assert t.conf.engine_pid
        os.kill(t.conf.engine_pid, signal.SIGSTOP)     # the engine must not make the room for us
        try:
            target = str(bfs / "filler.bin")
            t.store.create(target, None)
            data = os.urandom(32 << 20)
            offset = 0
            for size in (1 << 20, 4 << 10, 64):  # big pieces, then small ones up to the last byte the server takes
                with pytest.raises(mpiburst.errors.TierFullError):
                    while offset + size <= len(data):
                        t.store.commit(target, 0, data[offset:offset + size],
                                       [(offset + k, k, min(size, 256 << 10)) for k in range(0, size, 256 << 10)])
                        offset += size
            with mpiburst.open("burst://next.bin", "wb", tier=t) as f:
                f.write(b"checkpoint")
            mpiburst.sync("burst://next.bin", tier=t)
            assert (bfs / "next.bin").read_bytes() == b"checkpoint"
            mpiburst.sync("burst://filler.bin", tier=t)
            assert (bfs / "filler.bin").read_bytes() == data[:offset]   # nothing of the filler was lost
        finally:
            os.kill(t.conf.engine_pid, signal.SIGCONT)


# ----------------------------------------------------------------------------- raw server errors (#13 item 14)

@pytest.mark.timeout(120)
def test_a_full_or_stalled_server_gives_mpiburst_errors_not_raw_redis_ones(tmp_path, server_binary):
    """Promise: a server over its memory limit, or one that stopped answering, reaches users as an mpiburst error.

    Real faults: the server filled past ``maxmemory`` with data no flush can
    free (the engine stopped): Open with a write, pin and a queued sync raise
    ``TierFullError``; then the server stopped with SIGSTOP: Open raises
    ``TierConnectionError``; each one sentence saying what to do, never
    redis-py's ``OutOfMemoryError`` or ``TimeoutError`` (#13 item 14).
    """
    import redis

    from mpiburst.errors import TierConnectionError, TierFullError

    bfs = tmp_path / "bfs"
    bfs.mkdir()
    with Tier.start(id=f"oom{os.getpid()}", dir=str(tmp_path), bfs_root=str(bfs), capacity="16M",
                    server=server_binary) as t:
        with mpiburst.open("burst://kept.bin", "wb", tier=t) as f:
            f.write(b"kept")
        mpiburst.pin("burst://kept.bin", tier=t)             # nothing of the tier's files can be freed
        mpiburst.sync("burst://kept.bin", tier=t)
        assert (bfs / "kept.bin").read_bytes() == b"kept"
        os.kill(t.conf.engine_pid, signal.SIGSTOP)
        junk = 0
        try:
            for size in (1 << 20, 4 << 10, 64):   # big values, then small ones up to the last byte the server takes
                with pytest.raises(redis.OutOfMemoryError):   # the fault itself: the server refuses writes
                    while junk < 100_000:
                        t.redis.set(f"junk{junk}", os.urandom(size))
                        junk += 1
                # A connection that sent 1 MiB values keeps a query buffer of that size, which the server
                # frees about 2 s after it idles: the tier was then no longer full, and the test's outcome
                # hung on how long the calls below took. A new connection tops up with small values.
                t.redis.connection_pool.disconnect()
            def open_write_close() -> None:   # a new file's record alone (an Open writes nothing more) may
                f = File.Open(MPI.COMM_SELF, "burst://new.dat", RW)   # fit in the last bytes the server takes
                f.Write_at(0, b"n" * 65536)
                f.Close()

            calls = {
                "Open": open_write_close,
                "pin": lambda: mpiburst.pin(str(bfs / "kept.bin"), tier=t),
                "queued sync": lambda: mpiburst.sync("burst://kept.bin", tier=t, block=False),
            }
            for name, call in calls.items():
                # Topped up again right before each call: the server frees memory of its own now and then
                # (buffers of idle connections), and under load the last call came after such a moment.
                with pytest.raises(redis.OutOfMemoryError):
                    while junk < 200_000:
                        t.redis.set(f"junk{junk}", b"j" * 64)
                        junk += 1
                with pytest.raises(TierFullError, match="capacity") as info:
                    call()
                    pytest.fail(f"{name} on a full tier raised no TierFullError")
                assert str(info.value).endswith("."), f"{name}: {info.value}"
            os.kill(t.conf.pid, signal.SIGSTOP)            # a stall: the server no longer answers
            try:
                with pytest.raises(TierConnectionError, match="mpiburst status"):
                    File.Open(MPI.COMM_SELF, "burst://kept.bin", MPI.MODE_RDONLY)
            finally:
                os.kill(t.conf.pid, signal.SIGCONT)
            t.redis.delete(*(f"junk{i}" for i in range(junk)))
        finally:
            os.kill(t.conf.engine_pid, signal.SIGCONT)
        with mpiburst.open("burst://kept.bin", "rb", tier=t) as f:
            assert f.read() == b"kept"                        # nothing was lost


# ----------------------------------------------------------------------------- consistent cut (#13 item 1)

_CKPT_WRITER = """
import sys
import mpiburst
from mpiburst.tier import Tier
t = Tier.connect(conf=sys.argv[1])
n = 0
while True:
    n += 1
    with mpiburst.open(f"burst://sim/ckpt_{n:06d}.bin", "wb", tier=t, buffer="64K") as f:
        f.write(bytes([n % 251]) * (192 << 10))
    with mpiburst.open("burst://sim/latest", "r+b" if n > 1 else "wb", tier=t) as f:
        f.write(n.to_bytes(8, "little"))   # in place, one 8-byte write: no moment with an empty latest
    if n == 3:
        print("WRITING", flush=True)
"""


def _check_latest(bfs) -> int:
    """Assert that the checkpoint the BFS's ``latest`` names is on the BFS, complete; return its step."""
    latest = bfs / "sim" / "latest"
    if not latest.exists():
        return 0
    n = int.from_bytes(latest.read_bytes(), "little")
    ckpt = bfs / "sim" / f"ckpt_{n:06d}.bin"
    assert ckpt.exists(), f"the BFS's latest names step {n}, whose checkpoint the BFS does not have"
    assert ckpt.read_bytes() == bytes([n % 251]) * (192 << 10), f"checkpoint {n} on the BFS is not complete"
    return n


@pytest.mark.timeout(240)
def test_commit_while_the_application_writes_is_a_consistent_cut(tier):
    """Promise: a commit (SIGUSR1, stage-out) is a consistent cut: ``latest`` never names a missing checkpoint.

    A writer process loops: checkpoint N (written, closed), then ``latest =
    N``. Eight commits are taken while it runs, each checked on the BFS.
    Before the fix, stage-out synced a file list taken at its start, one
    file after another, and ``latest`` named a checkpoint the BFS lacked.
    (Each commit makes every checkpoint written since the last one durable,
    so the work grows with the commits' count: twenty took minutes under load.)
    """
    from mpiburst.jobrun import stage_out
    from mpiburst.policy import Policy

    bfs = Path(tier.bfs_root)
    writer = subprocess.Popen([sys.executable, "-c", _CKPT_WRITER, tier.conf.path], env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "WRITING", writer.stderr.read()[-2000:]
        seen = []
        for _ in range(8):
            stage_out(tier, Policy(), commit=True)
            seen.append(_check_latest(bfs))
        assert writer.poll() is None, writer.stderr.read()[-2000:]
    finally:
        writer.kill()
        writer.wait(10)
    assert seen[-1] > seen[0] >= 3        # the commits did follow the writer


@pytest.mark.parametrize("freed", ["clean data", "whole file"])
def test_a_commit_overtaken_by_a_later_flush_never_publishes_its_older_cut(mem_tier, monkeypatch, freed):
    """Promise: a commit whose cut a later flush (the engine's, another commit) overtook writes no stale bytes.

    Between a commit's cut and its lease, another flush put the file on the
    BFS and a purge freed the tier's copy. The commit must not rewrite the
    file from its older cut: the purged extents would read as holes, and the
    cut's pending truncation would turn them into zeros on the BFS (seen as
    an all-zero checkpoint under load). The cut is held back by hand here, on
    the memory store: the commit's logic, which sees the tier through the
    Store interface (the commit on a real server: the tests around this one).
    """
    from mpiburst import flush
    from mpiburst.residency import purge

    data = bytes(range(256)) * 768                       # 192 KiB, no zeros
    with mpiburst.open("burst://sim/ckpt", "wb", tier=mem_tier) as f:     # "wb": a truncation to apply
        f.write(data)
    stale = mem_tier.store.cut()
    assert stale[str(Path(mem_tier.bfs_root) / "sim" / "ckpt")].dirty
    flush.sync("burst://sim/ckpt", tier=mem_tier)             # the later flush ...
    purge("burst://sim/ckpt", tier=mem_tier, clean_only=freed == "clean data")   # ... and a purge that frees it
    monkeypatch.setattr(mem_tier.store, "cut", lambda: stale)
    flush.commit(tier=mem_tier)
    assert (Path(mem_tier.bfs_root) / "sim" / "ckpt").read_bytes() == data


_KILLED_COMMIT = """
import os, sys, threading, time
from mpiburst import flush
from mpiburst.tier import Tier
flush.snapshot.LEASE_SECONDS = 2.0
flush.writes.WRITE_SIZE = 1
where = sys.argv[2]
lock = threading.Lock()   # the commit's threads write and rename at once: one of them says HERE
if where == "journaling":
    rename = os.rename
    def pause(src, dst):
        if src.endswith(".json.tmp"):
            print("HERE", flush=True)
            time.sleep(60)
        rename(src, dst)
    os.rename = pause
elif where == "writing":
    def pause(p, o, n, seen=[]):
        with lock:
            seen.append(n)
            if len(seen) == 2:
                print("HERE", flush=True)
        if len(seen) >= 2:
            time.sleep(60)
    flush.writes.write_observers.append(pause)
else:
    rename = os.rename
    def pause(src, dst, seen=[]):
        rename(src, dst)
        if ".mpiburst-commit-" not in dst:
            with lock:
                seen.append(dst)
                if len(seen) == 1:
                    print("HERE", flush=True)
            time.sleep(60)
    os.rename = pause
flush.commit(tier=Tier.connect(conf=sys.argv[1]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["writing", "journaling", "renaming"])
def test_a_killed_commit_leaves_no_later_file_without_an_earlier_one(tier, where):
    """Promise: a commit killed midway publishes nothing, or (killed while renaming) all once completed.

    The application writes ``data/step`` (closed), then ``a_index`` naming
    it: the later file sorts first, so a one-by-one sync publishes it first.
    The commit is SIGKILLed while writing (nothing may be visible), while
    writing its journal (nothing visible, and the unfinished journal is
    removed by the next commit), or after its first rename (the journal lets the next sync, commit or stage-in
    finish the publication: then everything is visible).
    """
    from mpiburst import flush

    bfs = Path(tier.bfs_root)

    def write(step: int) -> None:
        with mpiburst.open("burst://data/step", "wb", tier=tier) as f:
            f.write(bytes([step]) * (1 << 20))
        with mpiburst.open("burst://a_index", "wb", tier=tier) as f:
            f.write(bytes([step]))

    def consistent() -> int:
        index = (bfs / "a_index").read_bytes()[0]
        assert (bfs / "data" / "step").read_bytes() == bytes([index]) * (1 << 20), \
            f"a_index on the BFS names step {index}, data/step on the BFS is another"
        return index

    write(1)
    flush.commit(tier=tier)
    assert consistent() == 1
    write(2)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_COMMIT, tier.conf.path, where], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HERE", proc.stderr.read()[-2000:]
    finally:
        proc.kill()
        proc.wait(10)
    if where in ("writing", "journaling"):
        assert consistent() == 1                   # nothing of the killed commit is visible
    else:
        assert flush.recover(tier.bfs_root) == 1    # what the next sync, commit or stage-in does first
        assert consistent() == 2
    reports = flush.commit(tier=tier)               # the data stayed dirty: the next commit lands it again
    assert {os.path.basename(r.path) for r in reports} == {"step", "a_index"}
    assert consistent() == 2
    assert sorted(os.listdir(bfs)) == ["a_index", "data"] and os.listdir(bfs / "data") == ["step"]


@pytest.mark.timeout(120)
def test_server_killed_during_a_sync_of_an_existing_file_leaves_it_whole(tmp_path, server_binary):
    """Promise: a server SIGKILLed in the middle of a sync leaves the BFS file's old version, whole.

    Before the fix an existing file was updated in place: the kill left it
    half new, half old, and the last good version was gone.
    """
    import signal

    from mpiburst import flush
    from mpiburst.errors import FlushError

    bfs = tmp_path / "bfs"
    bfs.mkdir()
    old = os.urandom(3 << 20)
    path = str(bfs / "results.dat")
    with open(path, "wb") as f:
        f.write(old)
    tier = Tier.start(id=f"kill{os.getpid()}", dir=str(tmp_path), bfs_root=str(bfs), capacity="64M",
                      server=server_binary, align="64K")
    try:
        with mpiburst.open("burst://results.dat", "r+b", tier=tier) as f:
            f.write(b"N" * len(old))
        writes = []

        def kill_server(p, off, n):
            writes.append(n)
            if len(writes) == 3:
                os.kill(tier.conf.pid, signal.SIGKILL)

        flush.writes.write_observers.append(kill_server)
        old_size, flush.writes.WRITE_SIZE = flush.writes.WRITE_SIZE, 64 << 10
        try:
            with pytest.raises(FlushError):
                flush.sync(path, tier=tier)
        finally:
            flush.writes.write_observers.remove(kill_server)
            flush.writes.WRITE_SIZE = old_size
        assert len(writes) >= 3
        assert open(path, "rb").read() == old                 # the last good version, byte for byte
    finally:
        try:
            tier.stop()
        except Exception:  # noqa: BLE001 - the server is dead: only its files are left to clean
            pass
