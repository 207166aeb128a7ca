"""``mpiburst run`` with real servers and real processes: success, each --on-failure, SIGUSR1, SIGTERM.

Each test runs ``python -m mpiburst run ... -- python job.py`` in a fresh
directory. ``job.py`` writes files into the tier the way the driver does
(register the file, push a batch to its channel), can wait for a go-file and
exits with a chosen status. After ``run`` returns, the tests check the BFS
bytes, the run's files (conf, snapshot) and that the server's PID is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import processes_gone
from conftest import cli_env
from mpiburst import server
from mpiburst.sizes import format_size

JOB = textwrap.dedent("""\
    import os, sys, time
    from mpiburst.tier import Tier
    from mpiburst.writeback import TierFile
    tier = Tier.current()
    open("conf_seen", "w").write(os.environ["MPIBURST_CONF"])
    status = int(sys.argv[1])
    for name in sys.argv[2:]:
        path = os.path.join(tier.bfs_root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf = TierFile(tier, path, 0)
        tf.store.create(path, None)
        tf.write(0, memoryview((name.encode() + b"|") * 5000))
        tf.push()
    open("ready", "w").close()
    if os.environ.get("JOB_WAIT"):
        deadline = time.monotonic() + 60
        while not os.path.exists("go") and time.monotonic() < deadline:
            time.sleep(0.05)
    sys.exit(status)
    """)


def content(name: str) -> bytes:
    """The bytes job.py writes to ``name``."""
    return (name.encode() + b"|") * 5000


@pytest.fixture
def job(tmp_path: Path, server_binary: str, server_pids_in):
    """Return ``start(*run_args, status=0, files=(...), wait=False) -> Popen`` of ``mpiburst run``."""
    (tmp_path / "bfs").mkdir()
    (tmp_path / "job.py").write_text(JOB)
    procs = []

    def start(*run_args: str, status: int = 0, files=("out/a.dat",), wait: bool = False) -> subprocess.Popen:
        env = cli_env(MPIBURST_SERVER=server_binary, **({"JOB_WAIT": "1"} if wait else {}))
        cmd = [sys.executable, "-m", "mpiburst", "run", "--id", "job", "--bfs-root", "bfs", "--capacity", "128M",
               *run_args, "--", sys.executable, "job.py", str(status), *files]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in server_pids_in(tmp_path):   # a run killed above leaves its server: never leak one
        os.kill(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def server_pid(tmp_path: Path) -> int:
    return json.loads((tmp_path / "mpiburst_job.conf").read_text())["pid"]


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Wait for ``path`` to appear; fail at once, with its output, if ``proc`` (the run) ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{path} never appeared: the run ended with status {proc.returncode}: {out}{err}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def gone(pid: int, binary: str) -> bool:
    return not server.pid_alive(pid, binary)


@pytest.mark.timeout(120)
def test_success_syncs_everything_and_stops(job, tmp_path: Path, server_binary: str) -> None:
    proc = job(files=("out/a.dat", "b.dat"))
    wait_for(tmp_path / "ready", proc)
    pid = server_pid(tmp_path)
    code, err = finish(proc)
    assert code == 0, err
    assert (tmp_path / "bfs/out/a.dat").read_bytes() == content("out/a.dat")
    assert (tmp_path / "bfs/b.dat").read_bytes() == content("b.dat")
    assert (tmp_path / "conf_seen").read_text() == str(tmp_path / "mpiburst_job.conf")
    assert gone(pid, server_binary)
    assert not (tmp_path / "mpiburst_job.conf").exists() and not (tmp_path / "redis_job.rdb").exists()
    assert "sync" in err and "stopped the tier of run job" in err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_failure_retains_then_stage_out_finishes(job, tmp_path: Path, server_binary: str, cli) -> None:
    proc = job(status=3)
    wait_for(tmp_path / "ready", proc)
    pid = server_pid(tmp_path)
    code, err = finish(proc)
    assert code == 3, err
    assert gone(pid, server_binary)
    assert not (tmp_path / "bfs/out/a.dat").exists()           # nothing flushed
    assert (tmp_path / "redis_job.rdb").exists()               # the dirty data is saved
    assert json.loads((tmp_path / "mpiburst_job.conf").read_text())["pid"] is None
    assert "mpiburst stage-out --id job" in err

    done = cli("stage-out", "--id", "job", "-v")
    assert done.returncode == 0, done.stderr
    assert "sync" in done.stdout and "out/a.dat" in done.stdout
    assert (tmp_path / "bfs/out/a.dat").read_bytes() == content("out/a.dat")
    assert not (tmp_path / "redis_job.rdb").exists() and not (tmp_path / "mpiburst_job.conf").exists()
    assert processes_gone(tmp_path)


@pytest.mark.timeout(180)
def test_failure_retained_run_is_reloaded_by_the_next_run(job, tmp_path: Path) -> None:
    code, err = finish(job(status=1, files=("first.dat",)))
    assert code == 1 and (tmp_path / "redis_job.rdb").exists(), err
    code, err = finish(job(status=0, files=("second.dat",)))
    assert code == 0, err
    assert "reloading the data run job saved" in err
    assert (tmp_path / "bfs/first.dat").read_bytes() == content("first.dat")
    assert (tmp_path / "bfs/second.dat").read_bytes() == content("second.dat")
    assert not (tmp_path / "redis_job.rdb").exists()


@pytest.mark.timeout(120)
def test_failure_sync_flushes_anyway(job, tmp_path: Path, server_binary: str) -> None:
    proc = job("--on-failure", "sync", status=2)
    wait_for(tmp_path / "ready", proc)
    pid = server_pid(tmp_path)
    code, err = finish(proc)
    assert code == 2, err
    assert (tmp_path / "bfs/out/a.dat").read_bytes() == content("out/a.dat")
    assert gone(pid, server_binary)
    assert not (tmp_path / "redis_job.rdb").exists() and not (tmp_path / "mpiburst_job.conf").exists()


@pytest.mark.timeout(120)
def test_failure_discard_drops_the_data(job, tmp_path: Path, server_binary: str) -> None:
    proc = job("--on-failure", "discard", status=2)
    wait_for(tmp_path / "ready", proc)
    pid = server_pid(tmp_path)
    code, err = finish(proc)
    assert code == 2, err
    assert not (tmp_path / "bfs/out/a.dat").exists()
    assert gone(pid, server_binary)
    assert not (tmp_path / "redis_job.rdb").exists() and not (tmp_path / "mpiburst_job.conf").exists()


@pytest.mark.timeout(120)
def test_sigusr1_commits_while_the_command_runs(job, tmp_path: Path, server_binary: str) -> None:
    proc = job(wait=True)
    wait_for(tmp_path / "ready", proc)
    pid = server_pid(tmp_path)
    proc.send_signal(signal.SIGUSR1)
    wait_for(tmp_path / "bfs/out/a.dat")
    deadline = time.monotonic() + 20
    while (tmp_path / "bfs/out/a.dat").stat().st_size < len(content("out/a.dat")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proc.poll() is None and not gone(pid, server_binary)   # still running, tier still up
    assert (tmp_path / "bfs/out/a.dat").read_bytes() == content("out/a.dat")
    (tmp_path / "go").touch()
    code, err = finish(proc)
    assert code == 0, err
    assert "SIGUSR1: committing" in err
    size = format_size(len(content("out/a.dat")))
    assert f"mpiburst commit: {size} of {size} (100%), " in err           # the commit's progress, all of it
    assert gone(pid, server_binary)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_abort_signal_is_forwarded_and_data_retained(job, tmp_path: Path, server_binary: str, sig: int) -> None:
    proc = job(wait=True)
    wait_for(tmp_path / "ready", proc)
    pid = server_pid(tmp_path)
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == 128 + sig, err                       # the command was killed by the forwarded signal
    assert gone(pid, server_binary)
    assert not (tmp_path / "bfs/out/a.dat").exists()
    assert (tmp_path / "redis_job.rdb").exists()


@pytest.mark.timeout(60)
def test_bad_policy_is_reported_before_anything_starts(job, tmp_path: Path) -> None:
    (tmp_path / "p.policy").write_text("SYNC out/\nKEEP tmp/\n")
    code, err = finish(job("--policy", "p.policy"))
    assert code == 2
    assert "p.policy:2" in err and "Traceback" not in err
    assert not (tmp_path / "ready").exists() and not (tmp_path / "mpiburst_job.conf").exists()


@pytest.mark.timeout(60)
def test_missing_command_exits_127_and_stops(job, tmp_path: Path, server_binary: str, cli) -> None:
    done = cli("run", "--id", "job", "--bfs-root", "bfs", "--capacity", "64M", "--", "no-such-program-xyz")
    assert done.returncode == 127, done.stderr
    assert processes_gone(tmp_path)
