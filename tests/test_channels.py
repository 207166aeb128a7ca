"""mem_io's channel workflow through ``mpiburst store/retrieve/channel-status/channel-reset`` on a real server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env
from mpiburst import channels, perms
from mpiburst.errors import ChannelBusyError, ChannelError
from mpiburst.tier import Tier


@pytest.fixture
def run12(cli, tmp_path: Path, server_binary: str):
    """A real run ``ch`` with 12 channels in tmp_path (started and stopped with the CLI)."""
    done = cli("start", "--id", "ch", "--channels", "12", "--capacity", "256M")
    assert done.returncode == 0, done.stderr
    tier = Tier.connect(id="ch", dir=str(tmp_path))
    yield tier
    tier.disconnect()
    cli("stop", "--id", "ch", "--discard")


def store_proc(tmp_path: Path, server_binary: str, channel: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpiburst", "store", "--id", "ch", "--channel", str(channel),
                             *extra], cwd=tmp_path, env=cli_env(MPIBURST_SERVER=server_binary),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def payload(channel: int) -> bytes:
    """Distinct data per channel; channel 3 spans several 1 MiB pieces, channel 7 is left empty."""
    if channel == 7:
        return b""
    size = 3 * channels.CHUNK + 12345 if channel == 3 else 1000 * (channel + 1)
    return bytes((channel * 7 + i) % 251 for i in range(size))


@pytest.mark.timeout(180)
def test_concurrent_stores_then_retrieve_orders_and_split(run12, cli, tmp_path: Path, server_binary: str) -> None:
    """Writers on channels 0, 3 (several pieces), 7 (empty), 10 and 11 (two digits) at once; the others unused."""
    procs = {c: store_proc(tmp_path, server_binary, c) for c in (11, 0, 7, 10, 3)}
    for c, proc in procs.items():          # all writers are open at once before any input ends
        proc.stdin.write(payload(c)[:100])
    for c, proc in procs.items():
        out, err = proc.communicate(payload(c)[100:], timeout=60)
        assert proc.returncode == 0, err
    expected = b"".join(payload(c) + b"\n" for c in range(12) if c in procs and payload(c))

    done = subprocess.run([sys.executable, "-m", "mpiburst", "retrieve", "--id", "ch"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == expected
    assert b"channel 5 is empty" in done.stderr and b"channel 7 is empty" in done.stderr

    one = subprocess.run([sys.executable, "-m", "mpiburst", "retrieve", "--id", "ch", "--channel", "3"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, timeout=60)
    assert one.stdout == payload(3) + b"\n"

    ids = subprocess.run([sys.executable, "-m", "mpiburst", "retrieve", "--id", "ch", "--print-id", "--sep", ":"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, timeout=60)
    assert ids.stdout == b"".join(f"{c}:".encode() + payload(c) + b"\n" for c in range(12) if c in procs and payload(c))

    (tmp_path / "split").mkdir()
    done = cli("retrieve", "--id", "ch", "--split", "--output-dir", "split")
    assert done.returncode == 0, done.stderr
    names = sorted(os.listdir(tmp_path / "split"))
    assert names == [f"data_ch_{c:02d}.dat" for c in range(12)]
    for c in range(12):
        path = tmp_path / "split" / f"data_ch_{c:02d}.dat"
        assert path.read_bytes() == (payload(c) if c in procs else b"")
        assert path.stat().st_mode & 0o777 == 0o666 & ~perms.current_umask()   # as a direct write: test_bfs_perms.py

    status = cli("channel-status", "--id", "ch", "--details")
    assert "5 closed, 0 open, 7 unused" in status.stdout
    assert f"channel 3: closed, {len(payload(3))} bytes, 1 stores" in status.stdout


@pytest.mark.timeout(120)
def test_one_writer_per_channel_and_append(run12, cli, tmp_path: Path, server_binary: str) -> None:
    first = store_proc(tmp_path, server_binary, 4)
    first.stdin.write(b"first ")
    first.stdin.flush()
    deadline = time.monotonic() + 30
    while channels.info(run12, 4)[0].state != "open":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = cli("store", "--id", "ch", "--channel", "4", "-", timeout=30)
    assert second.returncode == ChannelBusyError.exit_code == 24
    assert "channel 4" in second.stderr and "open" in second.stderr and "Traceback" not in second.stderr
    assert "0 closed, 1 open, 11 unused" in cli("channel-status", "--id", "ch").stdout
    first.communicate(b"writer", timeout=30)
    assert first.returncode == 0
    (tmp_path / "more").write_bytes(b" appended")
    assert cli("store", "--id", "ch", "--channel", "4", "more").returncode == 0
    assert b"".join(channels.read(run12, 4)) == b"first writer appended"


@pytest.mark.timeout(120)
def test_crashed_writer_channel_is_reset(run12, cli, tmp_path: Path, server_binary: str) -> None:
    writer = store_proc(tmp_path, server_binary, 2)
    writer.stdin.write(b"x" * 10)
    writer.stdin.flush()
    deadline = time.monotonic() + 30
    while channels.info(run12, 2)[0].state != "open":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    writer.kill()
    writer.wait(timeout=30)
    assert cli("store", "--id", "ch", "--channel", "2", "-").returncode == 24
    reset = cli("channel-reset", "--id", "ch")
    assert reset.returncode == 0 and "reset 1 open channel(s): 2" in reset.stdout
    (tmp_path / "in").write_bytes(b"after reset")
    assert cli("store", "--id", "ch", "--channel", "2", "in").returncode == 0
    assert b"".join(channels.read(run12, 2)) == b"after reset"


@pytest.mark.timeout(120)
def test_channel_out_of_range_exits_21(run12, cli, tmp_path: Path) -> None:
    """-1, 12 and 100 on a 12-channel run, one after the other on one run: each is refused and changes nothing."""
    (tmp_path / "in").write_bytes(b"data")
    for channel in ("-1", "12", "100"):
        done = cli("store", "--id", "ch", "--channel", channel, "in")
        assert done.returncode == ChannelError.exit_code == 21, channel
        assert "channels 0 to 11" in done.stderr and "Traceback" not in done.stderr, channel
        assert cli("retrieve", "--id", "ch", "--channel", channel).returncode == 21, channel


@pytest.mark.timeout(120)
def test_retrieve_round_trips_grow_linearly(run12) -> None:
    """Each piece crosses the network once: a channel of n pieces costs ceil(n / batch) LRANGE calls."""
    admin = run12.admin()

    def lrange_calls() -> int:
        return int(admin.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))

    calls = {}
    for channel, pieces in ((0, 37), (1, 74), (2, 148)):
        for i in range(pieces):      # each store of a small input adds one piece
            channels.store(run12, channel, io.BytesIO(f"{channel}:{i};".encode()))
        before = lrange_calls()
        data = b"".join(channels.read(run12, channel, batch=4))
        calls[pieces] = lrange_calls() - before
        assert data == b"".join(f"{channel}:{i};".encode() for i in range(pieces))
    assert calls == {37: 10, 74: 19, 148: 38}   # n // 4 + 1: full batches, then one short (or empty) reply
