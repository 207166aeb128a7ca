"""Faults of a run's lifecycle and its server's security, with real servers and real processes (issue #13).

Each test reproduces one fault of the fault tour and checks the promise of
``docs/reliability.md`` ("Lifecycle and security") that covers it: two starts
of one run, a snapshot that cannot be saved (a real 1 MiB tmpfs), a FIFO or
junk at the conf path, connection floods, credentials that could reopen the
server, a server killed under ``mpiburst run``, and the smaller errors people
see. The root-side Slurm scripts are tested in ``test_jobscripts_root.py``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import redis

import mpiburst

from conftest import cli_env, listening_tcp_ports, make_readonly_dir, processes_gone, undo_readonly_dir, wait_until
from mpiburst import server
from mpiburst.errors import ConfigError, ServerError
from mpiburst.runconf import AdminCredentials, RunConf
from mpiburst.server import StartOptions
from mpiburst.server.runlock import RunLock
from mpiburst.tier import Tier

#: A job: writes each named file (incompressible bytes, size from $JOB_BYTES) through mpiburst.open,
#: touches 'ready', waits for 'go' when $JOB_WAIT is set, exits with the status given.
JOB = textwrap.dedent("""\
    import os, sys, time
    import mpiburst
    status = int(sys.argv[1])
    for name in sys.argv[2:]:
        with mpiburst.open("burst://" + name, "wb") as f:
            f.write(os.urandom(int(os.environ.get("JOB_BYTES", "65536"))) if name != "fixed.dat" else b"fixed" * 999)
    open("ready", "w").close()
    if os.environ.get("JOB_WAIT"):
        deadline = time.monotonic() + 60
        while not os.path.exists("go") and time.monotonic() < deadline:
            time.sleep(0.02)
    sys.exit(status)
    """)


def _mpiburst(*args: str, cwd: Path, server_binary: str, wait: bool = True, timeout: float = 60,
              **env: str) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run (or with ``wait=False`` start) ``python -m mpiburst ARGS`` in ``cwd``."""
    cmd = [sys.executable, "-m", "mpiburst", *args]
    environ = cli_env(MPIBURST_SERVER=server_binary, **env)
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def _start_lock_held(path: Path) -> bool:
    """Return True if some process holds the run's start lock at ``path`` (never takes it for long)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False  # released: the last holder removes the file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock if we got it
    return False


def _clean_error(done: subprocess.CompletedProcess, prefix: str, *needles: str) -> None:
    """One line on stderr starting with ``prefix``, naming every needle; non-zero exit; no traceback."""
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), done.stderr
    for needle in needles:
        assert needle in last, done.stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "bfs").mkdir()
    (tmp_path / "job.py").write_text(JOB)
    return tmp_path


# ----------------------------------------------------------------------------- item 2: one run ID, two starters

@pytest.mark.timeout(120)
def test_second_run_of_the_same_id_is_refused_and_the_first_loses_nothing(workdir: Path, server_binary: str) -> None:
    first = _mpiburst("run", "--id", "twice", "--bfs-root", "bfs", "--capacity", "64M", "--",
                      sys.executable, "job.py", "0", "first.dat", cwd=workdir, server_binary=server_binary,
                      wait=False, JOB_WAIT="1")
    try:
        assert wait_until((workdir / "ready").exists, interval=0.005), "the child never got ready"
        (workdir / "ready").unlink()
        second = _mpiburst("run", "--id", "twice", "--bfs-root", "bfs", "--capacity", "64M", "--",
                           sys.executable, "job.py", "0", "second.dat", cwd=workdir, server_binary=server_binary)
        _clean_error(second, "mpiburst run: run twice is being started or used by mpiburst run (PID")
        assert not (workdir / "ready").exists()  # the second job's command never ran
        (workdir / "go").touch()
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert (workdir / "bfs/first.dat").stat().st_size == 65536  # the first job's data reached the BFS
    assert not (workdir / "bfs/second.dat").exists()
    assert processes_gone(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [  # the run's files are gone, its I/O report stays
        "bfs", "go", "job.py", "mpiburst_twice.report.html", "mpiburst_twice.report.json", "mpiburst_twice.stats.json"]


@pytest.mark.timeout(120)
def test_a_start_during_another_start_is_refused_and_leaves_no_orphan(tmp_path: Path, server_binary: str) -> None:
    """Stop the first ``mpiburst start`` (SIGSTOP) after it wrote its conf but before its server answers.

    "Before its server answers" is checked where the starter says so: it
    still holds the run's start lock (released only once the server answered).
    The window is the server's whole start-up, not a few statements.
    """
    for attempt in range(5):
        first = _mpiburst("start", "--id", "dup", "--capacity", "32M", cwd=tmp_path, server_binary=server_binary,
                          wait=False)
        conf = tmp_path / "mpiburst_dup.conf"
        assert wait_until(conf.exists, 60, 0.005), f"{conf} never appeared"
        first.send_signal(signal.SIGSTOP)
        mid_start = _start_lock_held(tmp_path / ".mpiburst_dup.lock")
        try:
            if mid_start:
                second = _mpiburst("start", "--id", "dup", "--capacity", "32M", cwd=tmp_path,
                                   server_binary=server_binary)
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        if mid_start:
            break
        assert _mpiburst("stop", "--id", "dup", cwd=tmp_path, server_binary=server_binary).returncode == 0
    else:
        pytest.fail("the first start was never caught before its server answered")
    _clean_error(second, "mpiburst start: run dup is being started or used by mpiburst start (PID")
    pid = int(dict(line.split("=", 1) for line in out.split())["MPIBURST_PID"])
    assert RunConf.load(str(conf)).pid == pid
    stop = _mpiburst("stop", "--id", "dup", cwd=tmp_path, server_binary=server_binary)
    assert stop.returncode == 0, stop.stderr
    assert processes_gone(tmp_path)  # no orphan: the only server was the first one's
    assert os.listdir(tmp_path) == []


def test_run_lock_is_reentrant_and_removed(tmp_path: Path) -> None:
    with RunLock(str(tmp_path), "r", "test"):
        with RunLock(str(tmp_path), "r", "test"):
            assert (tmp_path / ".mpiburst_r.lock").read_text() == f"{os.getpid()} test\n"
        assert (tmp_path / ".mpiburst_r.lock").exists()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- item 3: a snapshot that cannot be saved

@pytest.mark.timeout(180)
def test_unsaveable_snapshot_keeps_the_server_and_says_how_to_get_the_data(workdir: Path, server_binary: str,
                                                                           small_tmpfs) -> None:
    run_dir = small_tmpfs(workdir / "rundir", "1m")
    done = _mpiburst("run", "--id", "full", "--dir", str(run_dir), "--bfs-root", "bfs", "--capacity", "64M", "--",
                     sys.executable, "job.py", "3", "lost.dat", cwd=workdir, server_binary=server_binary,
                     JOB_BYTES=str(4 << 20), timeout=120)
    _clean_error(done, "mpiburst run: saving run full", "No space left on device", "nothing was stopped",
                 f"mpiburst stage-out --id full --dir {run_dir}")
    conf = RunConf.load(str(run_dir / "mpiburst_full.conf"))
    assert server.pid_alive(conf.pid, conf.server)  # the data is still in the running server
    # the advised command gets the data out; then the run can be stopped
    out = _mpiburst("stage-out", "--id", "full", "--dir", str(run_dir), cwd=workdir, server_binary=server_binary)
    assert out.returncode == 0, out.stderr
    assert (workdir / "bfs/lost.dat").stat().st_size == 4 << 20
    stop = _mpiburst("stop", "--id", "full", "--dir", str(run_dir), cwd=workdir, server_binary=server_binary)
    assert stop.returncode == 0, stop.stderr
    assert processes_gone(run_dir)


# ----------------------------------------------------------------------------- item 8: junk at the conf path

def _private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


JUNK = {
    "fifo": lambda p: os.mkfifo(p, 0o600),
    "directory": lambda p: os.mkdir(p),
    "nested": lambda p: _private(p, "[" * 50_000),
    "wrong-type": lambda p: _private(p, json.dumps(dict(
        id="J", dir=str(p.parent), host="", port="6379", socket="s", user="u", password="p" * 64, channels=1,
        bfs_root=str(p.parent), capacity=1 << 30, align=1 << 20, pid=None, server="x"))),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(JUNK))
def test_junk_at_the_conf_path_is_refused_at_once(workdir: Path, server_binary: str, kind: str) -> None:
    conf = workdir / "mpiburst_J.conf"
    JUNK[kind](conf)
    expected = {"fifo": "not a regular file", "directory": "not a regular file",
                "nested": "not valid JSON", "wrong-type": "wrong port"}[kind]
    for args in (("status", "--id", "J"), ("start", "--id", "J", "--capacity", "32M"), ("stop", "--id", "J"),
                 ("run", "--id", "J", "--capacity", "32M", "--", "true")):
        started = time.monotonic()
        done = _mpiburst(*args, cwd=workdir, server_binary=server_binary, timeout=30)
        assert time.monotonic() - started < 20, args  # never waits on a FIFO
        _clean_error(done, f"mpiburst {args[0]}: ", expected)
    assert processes_gone(workdir)


# ----------------------------------------------------------------------------- item 11: connection lockout

@pytest.mark.timeout(120)
def test_a_connection_flood_cannot_lock_a_one_node_run_out(tmp_path: Path, server_binary: str) -> None:
    with Tier.start(id="flood", dir=str(tmp_path), capacity="32M", server=server_binary, maxclients=16) as tier:
        ports = sorted(listening_tcp_ports(tier.conf.pid))
        assert ports == [] and tier.conf.port == 0  # one node: unix socket only
        flood = []
        try:
            for port in ports:  # what another user of the node could do to any TCP port of the server
                for _ in range(64):
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    flood.append(s)
            again = Tier.connect(conf=tier.conf)
            assert again.redis.set(b"k", b"v") and again.redis.get(b"k") == b"v"
            again.disconnect()
        finally:
            for s in flood:
                s.close()


# ----------------------------------------------------------------------------- item 12: credentials

REOPENING = [
    ("CONFIG", "SET", "bind", "0.0.0.0"),
    ("CONFIG", "SET", "protected-mode", "no"),
    ("CONFIG", "SET", "port", "6399"),
    ("CONFIG", "REWRITE"),
    ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all", "~*"),
    ("ACL", "DELUSER", "mpiburst"),
    ("ACL", "LIST"),
    ("MODULE", "LOAD", "/tmp/x.so"),
    ("DEBUG", "SLEEP", "0"),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("CLIENT", "KILL", "TYPE", "normal"),
]


def test_no_credential_can_reopen_the_server(tier: Tier) -> None:
    admin = tier.admin()
    for command in REOPENING:
        for client in (tier.redis, admin):  # the ranks' user and the lifecycle's admin user
            with pytest.raises(redis.exceptions.ResponseError):  # NOPERM, or MODULE / DEBUG disabled outright
                client.execute_command(*command)
            with pytest.raises(redis.exceptions.ResponseError):  # also refused inside a script
                client.eval(f"return redis.call({', '.join(repr(c) for c in command)})", 0)
    assert admin.config_get("bind")["bind"] == "127.0.0.1"
    assert admin.config_get("protected-mode")["protected-mode"] == "yes"
    assert admin.config_get("port")["port"] == "0"
    with pytest.raises(redis.exceptions.AuthenticationError):  # no intruder user was made
        redis.Redis(unix_socket_path=tier.conf.socket, username="intruder", password="x").ping()


def test_ranks_conf_holds_no_admin_credentials(tier: Tier) -> None:
    admin = AdminCredentials.load(tier.conf)
    text = Path(tier.conf.path).read_text()
    assert admin.password not in text and "admin_password" not in text
    assert os.stat(AdminCredentials.path_of(tier.conf)).st_mode & 0o777 == 0o600
    # the ranks' password cannot act as the admin user
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(unix_socket_path=tier.conf.socket, username=admin.user, password=tier.conf.password).ping()


# ----------------------------------------------------------------------------- item 14: the server dies under run

@pytest.mark.timeout(120)
def test_run_reports_a_dead_server_without_a_traceback(workdir: Path, server_binary: str) -> None:
    proc = _mpiburst("run", "--id", "dies", "--bfs-root", "bfs", "--capacity", "64M", "--",
                     sys.executable, "job.py", "0", "gone.dat", cwd=workdir, server_binary=server_binary,
                     wait=False, JOB_WAIT="1")
    try:
        assert wait_until((workdir / "ready").exists, interval=0.005), "the child never got ready"
        pid = RunConf.load(str(workdir / "mpiburst_dies.conf")).pid
        os.kill(pid, signal.SIGKILL)
        (workdir / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    _clean_error(done, "mpiburst run: the server of run dies", f"(PID {pid}) died while the command ran")
    assert processes_gone(workdir)
    assert not (workdir / "mpiburst_dies.conf").exists()


# ----------------------------------------------------------------------------- item 15: the smaller errors

@pytest.mark.parametrize("changes, message", [
    (dict(capcity="8G"), "unknown tier option 'capcity'; valid options are id, dir, channels"),
    (dict(capacity="1"), "too small: a tier needs at least 8.0 MiB"),
    (dict(maxclients=1), "maxclients 1 is too few: a run with 1 channel(s) needs at least 16"),
    (dict(channels=64, maxclients=100), "needs at least 136"),
    (dict(channels="4"), "channels must be a whole number"),
    (dict(port=70000), "out of range"),
    (dict(restart="yes"), "restart must be True or False"),
])
def test_start_options_are_checked_once_with_one_sentence(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StartOptions.of(**changes)


def test_misspelled_option_fails_before_anything_starts(tmp_path: Path, server_binary: str) -> None:
    with pytest.raises(ConfigError, match="unknown tier option 'capcity'"):
        Tier.start(id="typo", dir=str(tmp_path), capcity="32M", server=server_binary)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (("--capacity", "1"), "capacity '1' is too small"),
    (("--maxclients", "1"), "maxclients 1 is too few"),
])
def test_cli_refuses_too_small_settings(cli, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    for command in ("start", "run"):
        done = cli(command, "--id", "small", *args, *(["--", "true"] if command == "run" else []))
        _clean_error(done, f"mpiburst {command}: {message}")
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_a_run_directory_with_spaces_works(tmp_path: Path, server_binary: str) -> None:
    # Under a short base, not tmp_path: the socket inside must stay under the OS's 107 bytes whatever
    # the length of the user's name in pytest's /tmp/pytest-of-<user>/ (it failed for a newcomer's).
    short = Path(tempfile.mkdtemp(prefix="sp-", dir="/tmp"))
    run_dir = short / "my run dir \"quoted\""
    run_dir.mkdir(parents=True)
    try:
        _run_in_a_directory_with_spaces(tmp_path, run_dir, server_binary)
    finally:
        shutil.rmtree(short)


def _run_in_a_directory_with_spaces(tmp_path: Path, run_dir: Path, server_binary: str) -> None:
    (tmp_path / "bfs").mkdir()
    (tmp_path / "job.py").write_text(JOB)
    done = _mpiburst("run", "--dir", str(run_dir), "--id", "sp", "--bfs-root", "bfs", "--capacity", "32M", "--",
                     sys.executable, "job.py", "0", "fixed.dat", cwd=tmp_path, server_binary=server_binary)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bfs/fixed.dat").read_bytes() == b"fixed" * 999
    assert sorted(os.listdir(run_dir)) == ["mpiburst_sp.report.html", "mpiburst_sp.report.json",  # only the report
                                           "mpiburst_sp.stats.json"]
    assert processes_gone(tmp_path) and processes_gone(run_dir)   # the server worked in run_dir


def test_run_errors_are_prefixed_by_mpiburst_run(cli, tmp_path: Path) -> None:
    done = cli("run", "--id", "bad/id", "--", sys.executable, "-c", "pass")
    _clean_error(done, "mpiburst run: run ID 'bad/id' is not usable")


def test_save_failure_names_its_cause(tier: Tier) -> None:
    make_readonly_dir(Path(tier.conf.dir))  # the server cannot create its temporary snapshot file
    try:
        with pytest.raises(ServerError) as caught:
            server.stop_run(tier.conf, save=True)
    finally:
        undo_readonly_dir(Path(tier.conf.dir))
    message = str(caught.value)
    assert "failed ()" not in message and ("Permission denied" in message or "Operation not permitted" in message)
    assert server.pid_alive(tier.conf.pid, tier.conf.server)  # nothing was stopped



@pytest.mark.timeout(120)
def test_a_multi_node_save_failure_names_its_cause_and_stops_nothing(three_nodes, tmp_path: Path) -> None:
    """A failed SAVE of one node of a multi-node run says why (from its log) and how to get or drop the data.

    Before the fix the message said only "(see its log)" and left out the
    command that drops the data (#13 item 15 on a cluster tier).
    """
    conf = three_nodes("sv")
    make_readonly_dir(tmp_path)   # the servers cannot create their temporary snapshot files
    try:
        with pytest.raises(ServerError) as caught:
            server.stop_run(conf, save=True)
    finally:
        undo_readonly_dir(tmp_path)
    message = str(caught.value)
    assert "Permission denied" in message or "Operation not permitted" in message, message
    assert f"mpiburst stop --discard --id sv --dir {tmp_path}" in message and message.endswith("."), message
    assert all(server.pid_alive(n["pid"], conf.server) for n in conf.nodes)   # nothing was stopped


@pytest.mark.timeout(60)
def test_a_flush_waiting_for_an_expired_lease_says_so(tier: Tier, caplog) -> None:
    from mpiburst import flush

    path = os.path.join(tier.bfs_root, "leased.dat")
    with mpiburst.open(path, "wb", tier=tier) as f:
        f.write(b"lease" * 999)
    assert tier.store.lease(path, 3.0) is not None  # a flusher that died holding the lease
    with caplog.at_level(logging.WARNING, logger="mpiburst.flush"):
        flush.sync(path, tier=tier)
    assert "waits for its flush lease" in caplog.text and "expires within" in caplog.text
    assert Path(path).read_bytes() == b"lease" * 999


@pytest.mark.timeout(30)
def test_a_process_reaped_while_its_state_is_read_is_not_alive(monkeypatch) -> None:
    """Another process reaps the server between the liveness check's signal and its read of /proc.

    Seen at -n 6: rank 3 asked whether node 1's server was alive while rank 2,
    its parent, reaped it; the open of ``/proc/PID/stat`` succeeded, the read
    failed with ESRCH and the exe link was gone, which counted as "still
    exiting, alive". Here the reap happens inside that window, for real.
    """
    sleep = shutil.which("sleep")
    assert sleep
    victim = subprocess.Popen([sleep, "60"])
    real_open = open

    def open_then_reap(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if path == f"/proc/{victim.pid}/stat":
            victim.kill()
            victim.wait()
        return handle

    monkeypatch.setattr(server.process, "open", open_then_reap, raising=False)
    try:
        assert not server.pid_alive(victim.pid, sleep)
    finally:
        victim.kill()
        victim.wait()


def test_a_stale_engine_pid_taken_by_another_process_is_never_signalled(tmp_path: Path) -> None:
    """An engine that exited leaves its PID in the conf; once PIDs wrap (32768 here) another process may hold it.

    ``mpiburst stop`` SIGTERMed whatever held the engine's PID: in a parallel
    test run it killed a pytest worker. Only a process that is this run's
    engine (``-m mpiburst.engine``, working in the run directory) is signalled.
    """
    from mpiburst.runconf import RunConf
    from mpiburst.server import engine_alive, lifecycle

    other = tmp_path / "other"
    other.mkdir()
    sleep = "import time; time.sleep(60)"
    impostor = subprocess.Popen([sys.executable, "-c", sleep], cwd=tmp_path)          # a PID reused by anyone
    elsewhere = subprocess.Popen([sys.executable, "-c", sleep, "-m", "mpiburst.engine"], cwd=other)
    engine = subprocess.Popen([sys.executable, "-c", sleep, "-m", "mpiburst.engine"], cwd=tmp_path)
    try:
        assert not engine_alive(impostor.pid, str(tmp_path)) and not engine_alive(elsewhere.pid, str(tmp_path))
        assert engine_alive(engine.pid, str(tmp_path)) and not engine_alive(None, str(tmp_path))
        def conf(pid: int) -> RunConf:
            return RunConf(id="e", dir=str(tmp_path), host="", port=0, socket="s", user="u", password="p" * 64,
                           channels=1, bfs_root=str(tmp_path), capacity=1 << 30, align=1 << 20, pid=None,
                           server="x", engine_pid=pid)

        for proc in (impostor, elsewhere):
            lifecycle._end_engine(conf(proc.pid))
            assert proc.poll() is None          # not signalled
        lifecycle._end_engine(conf(engine.pid))
        assert engine.wait(10) == -signal.SIGTERM
    finally:
        for proc in (impostor, elsewhere, engine):
            proc.kill()
            proc.wait(10)
