"""``mpiburst start / status / stop`` end to end, with a real server, in subprocesses.

Every bad input must give one clear sentence on stderr, a non-zero exit, no
traceback, and leave nothing running.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import cli_env, make_readonly_dir, undo_readonly_dir

pytestmark = pytest.mark.timeout(120)


def _assignments(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines())


def _assert_clean_error(done: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """One line ``mpiburst <command>: ...`` with every fragment, non-zero exit, no traceback."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("mpiburst: warning:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"mpiburst {command}: ")
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_start_status_stop_cycle(cli, tmp_path, server_pids_in):
    run = tmp_path / "D"
    run.mkdir()
    start = cli("start", "--id", "X", "--channels", "4", "--dir", str(run), "--capacity", "64M")
    assert start.returncode == 0, start.stderr
    info = _assignments(start.stdout)
    assert list(info) == ["MPIBURST_ID", "MPIBURST_CONF", "MPIBURST_HOST", "MPIBURST_PORT", "MPIBURST_PID"]
    pid = int(info["MPIBURST_PID"])
    engine_pid = json.loads((run / "mpiburst_X.conf").read_text())["engine_pid"]
    assert sorted(server_pids_in(run)) == sorted([pid, engine_pid])  # the server and its engine
    made = sorted(os.listdir(run))
    assert made == [".mpiburst_X", "mpiburst_X.admin", "mpiburst_X.conf", "mpiburst_X.engine.log", "redis_X.conf",
                    "redis_X.log"]
    for name in made[1:]:
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(run / ".mpiburst_X").st_mode) == 0o700
    assert os.listdir(run / ".mpiburst_X") == ["redis.sock"]

    # The automatic engine is the one client beside us; a connection that just closed (the start's
    # readiness check, the engine's connect) may be counted for a moment on a loaded machine.
    deadline = time.monotonic() + 10
    while True:
        shown = cli("status", "--id", "X", "--dir", str(run), "--json")
        assert shown.returncode == 0, shown.stderr
        state = json.loads(shown.stdout)
        if state["clients"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state["up"] is True and state["pid"] == pid and state["channels"] == 4
    assert state["capacity"] == 64 << 20 and 0 < state["used_memory"] < state["capacity"]
    assert state["clients"] == 1
    text = cli("status", "--id", "X", "--dir", str(run))
    assert "up         yes" in text.stdout and "channels   4" in text.stdout

    stop = cli("stop", "--id", "X", "--dir", str(run))
    assert stop.returncode == 0, stop.stderr
    assert server_pids_in(run) == [] and not os.path.exists(f"/proc/{pid}/exe")
    assert not os.path.exists(f"/proc/{engine_pid}/exe")
    assert os.listdir(run) == []


def test_start_output_is_shell_evaluable(cli, tmp_path, server_binary):
    script = (f'set -a && eval "$({sys.executable} -m mpiburst start --id ev --capacity 32M)" && set +a && '
              f'echo "$MPIBURST_PORT $MPIBURST_CONF" && {sys.executable} -m mpiburst stop')
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=cli_env(MPIBURST_SERVER=server_binary),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    port, conf = done.stdout.split()
    assert int(port) == 0 and conf == str(tmp_path / "mpiburst_ev.conf")  # one node: unix socket only
    assert os.listdir(tmp_path) == []  # stop found the run through $MPIBURST_CONF


def test_save_then_restart_keeps_channels(cli, tmp_path):
    assert cli("start", "--id", "R", "-nr_channels", "5", "--capacity", "32M").returncode == 0
    assert cli("stop", "--id", "R", "--save").returncode == 0
    down = cli("status", "--id", "R")
    assert down.returncode == 3 and "up         no" in down.stdout
    again = cli("start", "--id", "R", "--restart", "--capacity", "32M")
    assert again.returncode == 0, again.stderr
    assert json.loads(cli("status", "--id", "R", "--json").stdout)["channels"] == 5
    assert cli("stop", "--id", "R", "--discard").returncode == 0
    assert os.listdir(tmp_path) == []


def test_foreground_stops_on_sigterm(cli, tmp_path, server_binary, server_pids_in):
    proc = subprocess.Popen([sys.executable, "-m", "mpiburst", "start", "--id", "fg", "--foreground",
                             "--capacity", "32M"], cwd=tmp_path, env=cli_env(MPIBURST_SERVER=server_binary),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        pid = int(_assignments("".join(lines))["MPIBURST_PID"])
        assert proc.poll() is None and pid in server_pids_in(tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert server_pids_in(tmp_path) == [] and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("count", ["0", "-3"])
def test_bad_channel_count(cli, tmp_path, server_pids_in, count):
    done = cli("start", "--id", "b", "--channels", count)
    _assert_clean_error(done, "start", "at least 1")
    assert server_pids_in(tmp_path) == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["stop", "status"])
def test_unknown_id(cli, command):
    _assert_clean_error(cli(command, "--id", "nosuchrun"), command, "no run conf", "mpiburst_nosuchrun.conf")


def test_bad_id(cli):
    _assert_clean_error(cli("start", "--id", "../evil"), "start", "not usable in file names")


@pytest.fixture
def running(cli, tmp_path):
    """A run ``B`` started by the CLI in tmp_path; stopped by PID at teardown whatever the test did."""
    done = cli("start", "--id", "B", "--capacity", "32M")
    assert done.returncode == 0, done.stderr
    pid = int(_assignments(done.stdout)["MPIBURST_PID"])
    yield tmp_path / "mpiburst_B.conf"
    if os.path.exists(f"/proc/{pid}"):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", [0o640, 0o644])
def test_insecure_conf_refused_but_stop_accepts_it(cli, running, mode, server_pids_in, tmp_path):
    running.chmod(mode)
    for command in ("status", "start"):
        done = cli(command, "--id", "B")
        _assert_clean_error(done, command, "accessible by group or others")
        assert "mpiburst stop" in done.stderr  # the advice leads somewhere
    assert server_pids_in(tmp_path)  # still running
    # the advice works: stop accepts the exposed conf (its password may be known: stopping is the cure)
    stop = cli("stop", "--id", "B")
    assert stop.returncode == 0, stop.stderr
    assert server_pids_in(tmp_path) == [] and not running.exists()


def test_symlinked_conf_refused(cli, running, tmp_path):
    (tmp_path / "mpiburst_L.conf").symlink_to(running)
    _assert_clean_error(cli("status", "--id", "L"), "status", "symlink")


def test_foreign_conf_refused(cli, running, server_binary):
    if os.geteuid() == 0:
        os.chown(running, 65534, 65534)
        done = cli("status", "--id", "B")
        os.chown(running, 0, 0)
    else:  # a file owned by root, found through $MPIBURST_CONF
        done = cli("status", env=cli_env(MPIBURST_SERVER=server_binary, MPIBURST_CONF="/etc/passwd"))
    _assert_clean_error(done, "status", "not by you")


def test_truncated_conf_refused(cli, running):
    text = running.read_text()
    with open(running, "w") as f:
        f.write(text[: len(text) // 2])
    _assert_clean_error(cli("status", "--id", "B"), "status", "truncated")


def test_conf_without_password_refused(cli, running):
    data = json.loads(running.read_text())
    data["password"] = ""
    running.write_text(json.dumps(data))
    _assert_clean_error(cli("status", "--id", "B"), "status", "has no password")


def test_wrong_password_refused(cli, running):
    data = json.loads(running.read_text())
    data["password"] = "0" * 64
    running.write_text(json.dumps(data))
    done = cli("status", "--id", "B")
    _assert_clean_error(done, "status", "refused the password")
    assert done.returncode == 51


def test_second_start_refused(cli, running, tmp_path):
    _assert_clean_error(cli("start", "--id", "B"), "start", "already has a server running")


def test_unwritable_dir(cli, tmp_path, server_pids_in):
    target = tmp_path / "ro"
    target.mkdir()
    make_readonly_dir(target)
    try:
        _assert_clean_error(cli("start", "--id", "w", "--dir", str(target)), "start", "not writable", "--dir")
    finally:
        undo_readonly_dir(target)
    assert os.listdir(target) == [] and server_pids_in(tmp_path) == []


def test_socket_path_too_long(cli, tmp_path, server_pids_in):
    _assert_clean_error(cli("start", "--id", "s", "--socket-dir", str(tmp_path / ("x" * 110))), "start",
                        "more than the OS allows", "--socket-dir")
    assert os.listdir(tmp_path) == [] and server_pids_in(tmp_path) == []


def test_server_binary_missing(cli, tmp_path):
    _assert_clean_error(cli("start", "--id", "m", "--server", str(tmp_path / "no-such-server")), "start",
                        "not an executable")
    assert os.listdir(tmp_path) == []


def test_server_dies_during_startup(cli, tmp_path, server_pids_in):
    fake = tmp_path / "dying-server"
    fake.write_text("#!/bin/sh\necho 'oom: cannot map the tier' >&2\nexit 1\n")
    fake.chmod(0o755)
    _assert_clean_error(cli("start", "--id", "d", "--server", str(fake)), "start", "exited during start-up",
                        "oom: cannot map the tier")
    assert os.listdir(tmp_path) == ["dying-server"] and server_pids_in(tmp_path) == []
