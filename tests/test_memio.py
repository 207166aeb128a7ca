"""mem_io's commands (``python -m mpiburst.memio``, the code behind ``mem_io_*``) against a real server.

A mem_io job script's sequence: start with N channels, producers pipe into
stores, retrieve (stdout, one channel, split, with ids), status, stop (the
snapshot stays), start -restart, and mem_io's exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _server_pids_in, cli_env
from mpiburst.tier import Tier


@pytest.fixture
def memio(tmp_path: Path, server_binary: str):
    """Return ``run(command, *options, input=b"")`` of ``python -m mpiburst.memio`` in tmp_path (PBS_JOBID set)."""
    env = cli_env(MPIBURST_SERVER=server_binary, PBS_JOBID="4711.pbs")

    def run(command: str, *options: str, input: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mpiburst.memio", command, *options], cwd=tmp_path, env=env,
                              input=input, capture_output=True, timeout=60)

    yield run
    run("stop")
    subprocess.run([sys.executable, "-m", "mpiburst", "stop", "--discard", "--id", "4711.pbs"], cwd=tmp_path,
                   env=env, capture_output=True, timeout=60)
    assert not _server_pids_in(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mem_io_job_script_sequence(memio, tmp_path: Path) -> None:
    assert memio("start", "-nr_channels", "10").returncode == 0
    assert (tmp_path / "mpiburst_4711.pbs.conf").stat().st_mode & 0o777 == 0o600    # ID from PBS_JOBID
    for c in (0, 3, 9):
        done = memio("store", "-channel_id", str(c), input=f"task {c}\n".encode() * (c + 1))
        assert done.returncode == 0, done.stderr
    assert memio("store", "-channel_id", "3", input=b"more").returncode == 0    # appended

    out = memio("retrieve")
    assert out.returncode == 0
    assert out.stdout == b"task 0\n\n" + b"task 3\n" * 4 + b"more\n" + b"task 9\n" * 10 + b"\n"
    assert memio("retrieve", "-channel_id", "9").stdout == b"task 9\n" * 10 + b"\n"
    assert memio("retrieve", "-print_id", "-sep", "|").stdout.startswith(b"0|task 0\n\n3|task 3\n")

    assert memio("retrieve", "-split").returncode == 0
    assert (tmp_path / "data_4711.pbs_03.dat").read_bytes() == b"task 3\n" * 4 + b"more"
    assert (tmp_path / "data_4711.pbs_00.dat").read_bytes() == b"task 0\n"
    assert (tmp_path / "data_4711.pbs_05.dat").read_bytes() == b""

    status = memio("status", "-details")
    assert b"3 closed, 0 open, 7 unused" in status.stdout and b"channel 3: closed, 32 bytes" in status.stdout

    assert memio("stop").returncode == 0
    assert (tmp_path / "redis_4711.pbs.rdb").exists()
    assert memio("start", "-restart").returncode == 0
    assert memio("retrieve", "-channel_id", "0").stdout == b"task 0\n\n"


@pytest.mark.timeout(120)
def test_mem_io_exit_codes(memio) -> None:
    for n in ("0", "-3"):
        bad = memio("start", "-nr_channels", n)
        assert bad.returncode == 22 and b"at least 1" in bad.stderr
    assert memio("start", "-nr_channels", "2").returncode == 0
    for c in ("2", "-1"):
        bad = memio("store", "-channel_id", c, input=b"x")
        assert bad.returncode == 21 and b"Traceback" not in bad.stderr
    assert memio("retrieve", "-channel_id", "5").returncode == 21


@pytest.mark.timeout(120)
def test_mem_io_busy_channel_and_reset(memio, tmp_path: Path) -> None:
    assert memio("start", "-nr_channels", "2").returncode == 0
    tier = Tier.connect(id="4711.pbs", dir=str(tmp_path))
    try:
        assert tier.store.channel_open(1)    # what a killed mem_io_store leaves behind
        busy = memio("store", "-channel_id", "1", input=b"x")
        assert busy.returncode == 24 and b"open" in busy.stderr
        assert b"0 closed, 1 open, 1 unused" in memio("status").stdout
        assert memio("reset").returncode == 0
        assert memio("store", "-channel_id", "1", input=b"x").returncode == 0
    finally:
        tier.disconnect()


@pytest.mark.timeout(60)
def test_wrong_password_exits_51(memio, tmp_path: Path) -> None:
    assert memio("start", "-nr_channels", "1").returncode == 0
    conf = tmp_path / "mpiburst_4711.pbs.conf"
    data = json.loads(conf.read_text())
    good = data["password"]
    data["password"] = "0" * 64
    tmp = tmp_path / "c.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps(data).encode())
    os.close(fd)
    os.replace(tmp, conf)
    try:
        bad = memio("store", "-channel_id", "0", input=b"x")
        assert bad.returncode == 51 and b"refused the password" in bad.stderr
    finally:
        data["password"] = good
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, json.dumps(data).encode())
        os.close(fd)
        os.replace(tmp, conf)
