"""The Slurm prolog and epilog as root, against a job user who plants traps (issue #13 items 8-10).

The scripts run as root (as slurmd runs them) for a job of a second local
user (``second_user``, made with useradd). That user controls the run
directory, so it can plant symlinks to root's files, FIFOs, and a conf naming
any PID and binary. Each test checks that root followed no such trap: root's
files and directories are unchanged, root's processes alive, and the script
returned promptly. Not root: skipped (CI, with ``MPIBURST_REQUIRE_TOOLS=1``, fails).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, cli_env

SCRIPTS = REPO / "jobscripts" / "slurm"
JOB = "990002"


@pytest.fixture
def base(second_user) -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp that the second user can traverse (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mpb-root-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(base: Path, site: Path, user) -> dict:
    return cli_env(SLURM_JOB_ID=JOB, SLURM_JOB_USER=user.pw_name, SLURM_NTASKS="1", MPIBURST_SITE_DIR=str(site),
                   MPIBURST_BFS_ROOT=str(base), MPIBURST_CAPACITY="32M", MPIBURST_PYTHON=sys.executable,
                   MPIBURST_SITE_CONF=str(base / "none.sh"), MPIBURST_STAGEOUT_TIMEOUT="5")


def _root_file(base: Path) -> Path:
    target = base / "root-owned.txt"
    target.write_text("root's own\n")
    target.chmod(0o644)
    return target


def _run(script: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPTS / script)], env=env, capture_output=True, text=True, timeout=timeout)
    done.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stderr  # a failing prolog/epilog drains the node
    return done


def _user_run_dir(site: Path, user) -> Path:
    """The run directory as a requeued job finds it: made by root, handed to the user."""
    site.mkdir(mode=0o755, exist_ok=True)
    run_dir = site / JOB
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, user.pw_uid, user.pw_gid)
    return run_dir


def _plant(link: Path, target: Path, user) -> None:
    """Make ``link`` a symlink to ``target``, owned by the user (as the user would plant it)."""
    link.symlink_to(target)
    os.chown(link, user.pw_uid, user.pw_gid, follow_symlinks=False)


@pytest.mark.timeout(120)
def test_prolog_hands_no_root_directory_to_the_user(base: Path, second_user) -> None:
    """A site directory the user owns, holding the job's run directory as a symlink to a root directory."""
    site = base / "site"
    site.mkdir()
    os.chown(site, second_user.pw_uid, second_user.pw_gid)
    secret = base / "root-dir"
    secret.mkdir(mode=0o700)
    _plant(site / JOB, secret, second_user)
    done = _run("prolog.sh", _env(base, site, second_user))
    st = secret.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)  # not chowned, not chmodded
    assert "not starting the tier" in done.stderr


@pytest.mark.timeout(120)
def test_prolog_writes_its_log_as_the_user(base: Path, second_user) -> None:
    """A requeued job's run directory with ``prolog.log`` planted as a symlink to a root file."""
    site = base / "site"
    run_dir = _user_run_dir(site, second_user)
    target = _root_file(base)
    _plant(run_dir / "prolog.log", target, second_user)
    _run("prolog.sh", _env(base, site, second_user))
    assert target.read_text() == "root's own\n"
    assert target.stat().st_uid == 0


@pytest.mark.timeout(120)
def test_epilog_kills_no_process_the_user_names_and_writes_as_the_user(base: Path, second_user) -> None:
    """The conf names root's own ``sleep`` as the server; ``epilog.log`` is a symlink to a root file."""
    site = base / "site"
    run_dir = _user_run_dir(site, second_user)
    victim = subprocess.Popen(["sleep", "300"], cwd=run_dir)  # root's process, even in the run directory
    try:
        conf = run_dir / f"mpiburst_{JOB}.conf"
        conf.write_text(json.dumps(dict(id=JOB, dir=str(run_dir), host="", port=0, socket=str(run_dir / "s"),
                                        user="mpiburst", password="p" * 64, channels=1, bfs_root=str(base),
                                        capacity=1 << 25, align=1 << 20, pid=victim.pid, server="/usr/bin/sleep")))
        conf.chmod(0o600)
        os.chown(conf, second_user.pw_uid, second_user.pw_gid)
        target = _root_file(base)
        _plant(run_dir / "epilog.log", target, second_user)
        _run("epilog.sh", _env(base, site, second_user))
        assert victim.poll() is None  # root's sleep was not killed
        assert target.read_text() == "root's own\n"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_epilog_is_not_blocked_by_a_fifo_conf(base: Path, second_user) -> None:
    site = base / "site"
    run_dir = _user_run_dir(site, second_user)
    os.mkfifo(run_dir / f"mpiburst_{JOB}.conf", 0o600)
    os.chown(run_dir / f"mpiburst_{JOB}.conf", second_user.pw_uid, second_user.pw_gid)
    done = _run("epilog.sh", _env(base, site, second_user), timeout=90)
    assert done.elapsed < 30  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_epilog_kills_the_users_server_that_will_not_stop_and_nothing_else(base: Path, second_user) -> None:
    """A server of the job's user that stage-out and stop cannot end is killed, as the user; the user's
    other process running the same binary elsewhere is left alone."""
    site = base / "site"
    run_dir = _user_run_dir(site, second_user)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    ids = dict(user=second_user.pw_uid, group=second_user.pw_gid)
    stuck = subprocess.Popen(["sleep", "300"], cwd=run_dir, **ids)      # stands for a hung server
    other = subprocess.Popen(["sleep", "300"], cwd=elsewhere, **ids)    # the user's, not the job's server
    try:
        for name, pid in (("server", stuck.pid), ("other", other.pid)):
            conf = run_dir / f"mpiburst_{JOB}.conf"
            conf.write_text(json.dumps(dict(id=JOB, dir=str(run_dir), host="", port=0, socket=str(run_dir / "s"),
                                            user="mpiburst", password="p" * 64, channels=1, bfs_root=str(base),
                                            capacity=1 << 25, align=1 << 20, pid=pid,
                                            server=shutil.which("sleep"))))
            conf.chmod(0o600)
            os.chown(conf, second_user.pw_uid, second_user.pw_gid)
            _run("epilog.sh", _env(base, site, second_user))
        assert stuck.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
        assert "killing it" in (run_dir / "epilog.log").read_text()
    finally:
        for proc in (stuck, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _nodes_env(base: Path, shared: Path, user, node: int) -> dict:
    """A prolog/epilog call on node ``node`` of a 3-node job whose tier lives in the shared directory."""
    return dict(_env(base, base / "site", user), MPIBURST_SHARED_DIR=str(shared), MPIBURST_NODES="3",
                MPIBURST_NODE_INDEX=str(node), SLURM_NTASKS="3")


@pytest.mark.timeout(120)
def test_epilog_of_node_k_kills_no_process_its_entry_names(base: Path, second_user) -> None:
    """Node 1's entry file, the user's to write, names root's own ``sleep`` running in the run directory."""
    shared = base / "shared"
    run_dir = _user_run_dir(shared, second_user)
    victim = subprocess.Popen(["sleep", "300"], cwd=run_dir)
    try:
        entry = run_dir / f"mpiburst_{JOB}@1.node"
        entry.write_text(json.dumps(dict(pid=victim.pid, server=shutil.which("sleep"))))
        os.chown(entry, second_user.pw_uid, second_user.pw_gid)
        done = _run("epilog.sh", _nodes_env(base, shared, second_user, 1))
        assert victim.poll() is None and done.elapsed < 30  # type: ignore[attr-defined]
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
