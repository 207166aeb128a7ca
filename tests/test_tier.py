"""The Tier API in one process: real servers, plus the memory tier (unit tests, named as such)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import sys

import pytest
import redis

from mpiburst import server
from mpiburst.server import process
from mpiburst.errors import AuthenticationError, ConfigError
from mpiburst.runconf import RunConf
from mpiburst.tier import Tier

from conftest import cli_env

pytestmark = pytest.mark.timeout(120)


def test_memory_tier_unit(mem_tier, tmp_path):
    """Unit test of the memory tier: same interface, no server."""
    assert mem_tier.is_memory and mem_tier.channels == 1 and mem_tier.align == 1 << 20
    assert mem_tier.bfs_root == str(tmp_path / "bfs")
    assert mem_tier.redis is None and mem_tier.store.empty()
    mem_tier.store.create("/x", None)
    assert not mem_tier.store.empty()
    with pytest.raises(ConfigError, match="no server"):
        mem_tier.admin()
    assert mem_tier.status()["engine"] == "memory"
    assert Tier.current() is mem_tier
    mem_tier.stop()
    assert mem_tier.status()["up"] is False
    assert Tier._current is None


def test_tier_fixture_properties(tier, tmp_path, server_binary):
    assert tier.channels == 1 and tier.capacity == 256 << 20
    assert tier.bfs_root == str(tmp_path / "bfs")
    assert tier.align % (1 << 20) == 0
    assert tier.conf.server == server_binary
    assert tier.redis.set(b"x", b"y") and tier.redis.get(b"x") == b"y"  # bytes, no decoding
    assert tier.redis.connection_pool.connection_kwargs.get("path") == tier.conf.socket  # unix socket on this host
    state = tier.status()
    assert state["up"] and state["pid"] == tier.conf.pid and state["used_memory"] > 0
    assert Tier.current() is tier


def test_admin_and_user_are_separate(tier):
    with pytest.raises(redis.ResponseError):
        tier.redis.execute_command("SHUTDOWN", "NOSAVE")
    assert "connected_clients" in tier.admin().info()


def test_connect_by_id_path_env_and_current(tier, monkeypatch):
    by_id = Tier.connect(id=tier.id, dir=tier.conf.dir)
    by_path = Tier.connect(conf=tier.conf.path)
    monkeypatch.setenv("MPIBURST_CONF", tier.conf.path)
    Tier._current = None
    by_env = Tier.current()
    for other in (by_id, by_path, by_env):
        assert other.conf == tier.conf and other.redis.ping()
    assert Tier.current() is by_env
    by_env.disconnect()
    assert tier.redis.ping()  # disconnecting leaves the server up


def test_connect_falls_back_to_tcp(tmp_path, server_binary):
    with Tier.start(id="tcp", dir=str(tmp_path), capacity="32M", server=server_binary, bind="127.0.0.1") as tier:
        assert tier.conf.port  # --bind opens TCP on one node too
        conf = RunConf(**{**tier.conf.__dict__, "socket": "/nonexistent/redis.sock"})
        other = Tier.connect(conf=conf)
        assert other.redis.connection_pool.connection_kwargs.get("port") == tier.conf.port
        assert other.redis.ping()
        other.disconnect()


def test_wrong_password(tier):
    conf = RunConf(**{**tier.conf.__dict__, "password": "f" * 64})
    with pytest.raises(AuthenticationError, match="refused the password"):
        Tier.connect(conf=conf)


def test_connect_unknown_run(tmp_path):
    with pytest.raises(ConfigError, match="no run conf"):
        Tier.connect(id="nothere", dir=str(tmp_path))


def test_context_manager_stops_on_error(tmp_path, server_binary):
    with pytest.raises(RuntimeError, match="body failed"):
        with Tier.start(id="cm", dir=str(tmp_path), capacity="32M", server=server_binary) as t:
            pid = t.conf.pid
            assert server.pid_alive(pid)
            raise RuntimeError("body failed")
    assert not server.pid_alive(pid)
    assert os.listdir(tmp_path) == []


def test_stop_with_save_and_restart(tmp_path, server_binary):
    t = Tier.start(id="sv", dir=str(tmp_path), channels=3, capacity="32M", server=server_binary)
    t.redis.set(b"k", b"v")
    t.stop(save=True)
    with Tier.start(id="sv", dir=str(tmp_path), restart=True, capacity="32M", server=server_binary) as again:
        assert again.channels == 3 and again.redis.get(b"k") == b"v"
    assert sorted(os.listdir(tmp_path)) == ["mpiburst_sv.conf", "redis_sv.rdb"]  # the old snapshot stays
    server.stop_run(RunConf.load(str(tmp_path / "mpiburst_sv.conf")), discard=True)
    assert os.listdir(tmp_path) == []


def test_single_process_start_never_imports_mpi(tmp_path, server_binary):
    code = ("import sys\nfrom mpiburst.tier import Tier\n"
            f"t = Tier.start(id='nompi', dir={str(tmp_path)!r}, capacity='32M')\n"
            "assert t.channels == 1\nt.stop()\nprint('mpi4py' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(MPIBURST_SERVER=server_binary),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert os.listdir(tmp_path) == []


def test_stop_after_the_server_was_killed_ends_its_engine_too(tmp_path, server_binary):
    """Promise: stopping a tier whose server died leaves no process behind: its engine is ended, not left to notice.

    (It used to be left running, a child this process never waited for:
    the ResourceWarning of tests/test_checkpoint_mpi.py.)
    """
    tier = Tier.start(id="killed", dir=str(tmp_path), capacity="32M", server=server_binary)
    engine = tier.conf.engine_pid
    assert process.pid_alive(engine)
    os.kill(tier.conf.pid, signal.SIGKILL)
    assert process.wait_gone(tier.conf.pid, server_binary, 10)
    tier.stop()
    assert not process.pid_alive(engine)   # ended and reaped by stop(), not a second later by itself
    assert os.listdir(tmp_path) == []


def test_stop_reaps_the_server_and_its_engine(tmp_path, server_binary):
    """Promise: after stop() the server and its engine are gone and reaped, never left as zombies.

    A server's main thread can show as a zombie while its other threads
    still exit, when it cannot be reaped yet; stop() used to take that for
    gone and leave the process unreaped (a ResourceWarning at exit). Ten
    stops: before the fix, 30 stops hit that window at the 1st and the 14th.
    """
    for k in range(10):
        tier = Tier.start(id=f"reap{k}", dir=str(tmp_path), capacity="32M", server=server_binary)
        pids = (tier.conf.pid, tier.conf.engine_pid)
        tier.stop()
        for pid in pids:
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)   # no such child any more: stop() waited for it


def test_server_dies_with_its_starting_process(tmp_path, server_binary, server_pids_in):
    code = ("import os\nfrom mpiburst.tier import Tier\n"
            f"t = Tier.start(id='orphan', dir={str(tmp_path)!r}, capacity='32M')\n"
            "print(t.conf.pid, flush=True)\nos._exit(1)\n")  # like a rank killed by MPI_Abort
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(MPIBURST_SERVER=server_binary),
                          capture_output=True, text=True, timeout=60)
    pid = int(done.stdout)
    assert process.wait_gone(pid, server_binary, 10)
    deadline = time.monotonic() + 10  # the engine notices its server is gone within a second
    while server_pids_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server_pids_in(tmp_path) == []
    again = Tier.start(id="orphan", dir=str(tmp_path), capacity="32M", server=server_binary)  # stale: replaced
    again.stop()
    assert os.listdir(tmp_path) == []
