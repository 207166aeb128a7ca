"""The command line and the engine on a multi-node run, and one node's server dying (#15).

Three cluster-mode servers on this machine (:func:`mpiburst.server.start_cluster`);
each node's data is written through a tier attached as that node
(:func:`mpiburst.tier.open_store`), then the ``mpiburst`` commands run in
subprocesses, as a user runs them: they are on no node and reach every server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mpiburst
from mpiburst import server
from mpiburst.runconf import RunConf
from mpiburst.tier import Tier

from conftest import EXAMPLES, expected_file, job_env

pytestmark = pytest.mark.timeout(180)

SIZE = 300_000


def _payload(k: int) -> bytes:
    return bytes((k * 7 + i) % 251 for i in range(SIZE))


@pytest.fixture
def run(three_nodes):
    """A 3-node run (3 channels) with ``f<k>`` written by node ``k`` and ``shared`` written by all three."""
    conf = three_nodes("cc")
    for k in range(3):
        tier = Tier._attach(conf, node=k)
        with mpiburst.open(f"burst://f{k}", "wb", tier=tier) as f:
            f.write(_payload(k))
        with mpiburst.open("burst://shared", "r+b" if k else "wb", tier=tier) as f:
            f.seek(k * SIZE)
            f.write(_payload(k))
        tier.disconnect()
    return RunConf.load(conf.path)


def test_each_node_holds_its_own_data_and_status_lists_the_nodes(run, cli):
    used = [server.connect_redis(run.node(k)).info("memory")["used_memory"] for k in range(3)]
    assert all(u > SIZE for u in used)  # every node's bytes went to its own server
    out = cli("status", "--id", "cc", "--dir", run.dir)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("node ")]
    assert len(lines) == 3 and all(" up " in ln for ln in lines)
    assert "ranks 0-0" in lines[0] and "ranks 2-2" in lines[2] and "on 3 servers" in out.stdout
    state = json.loads(cli("status", "--json", "--id", "cc", "--dir", run.dir).stdout)
    assert [n["up"] for n in state["nodes"]] == [True] * 3 and state["up"]


def test_sync_frag_stat_purge_gather_every_node(run, cli):
    out = cli("frag-stat", "--id", "cc", "--dir", run.dir, "burst://shared")
    assert out.returncode == 0, out.stderr
    out = cli("sync", "-b", "--id", "cc", "--dir", run.dir, "burst://shared", "burst://f1", "burst://f2")
    assert out.returncode == 0, out.stderr
    bfs = os.path.realpath(run.bfs_root)
    with open(os.path.join(bfs, "shared"), "rb") as f:
        assert f.read() == b"".join(_payload(k) for k in range(3))
    with open(os.path.join(bfs, "f2"), "rb") as f:
        assert f.read() == _payload(2)
    out = cli("purge", "-k", "--id", "cc", "--dir", run.dir, "burst://shared")
    assert out.returncode == 0, out.stderr
    with mpiburst.open("burst://shared", "rb", tier=Tier.connect(conf=run)) as f:
        assert f.read() == b"".join(_payload(k) for k in range(3))  # read back from the BFS after the purge


def test_a_dead_node_names_its_files_and_the_others_still_flush(run, cli, server_pids_in, tmp_path):
    os.kill(run.nodes[1]["pid"], signal.SIGKILL)
    out = cli("status", "--id", "cc", "--dir", run.dir)
    assert out.returncode == 3 and "DOWN" in out.stdout
    out = cli("sync", "-b", "--id", "cc", "--dir", run.dir, "burst://f1")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "node 1" in out.stderr and "f1" in out.stderr and "shared" in out.stderr  # the files that lost data
    assert not os.path.exists(os.path.join(run.bfs_root, "f1"))  # nothing was published from a partial read
    out = cli("sync", "-b", "--id", "cc", "--dir", run.dir, "burst://f0", "burst://f2")
    assert out.returncode == 0, out.stderr
    for k in (0, 2):
        with open(os.path.join(run.bfs_root, f"f{k}"), "rb") as f:
            assert f.read() == _payload(k)
    out = cli("stop", "--id", "cc", "--dir", run.dir)
    assert out.returncode == 0 and "node 1 had already ended" in out.stderr
    assert server_pids_in(tmp_path) == []


def test_mpiburst_run_on_three_nodes(tmp_path, server_binary, server_pids_in):
    """'mpiburst run --nodes 3' starts the server job, the 6 ranks write to their nodes, stage-out, nothing left."""
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = job_env(server_binary, MPIBURST_NODE_LAUNCH=f"{mpiexec} -n 3", MPIBURST_RANKS_PER_NODE="2")
    app = [mpiexec, "-n", "6", sys.executable, str(EXAMPLES / "checkpoint_restart.py"), "--steps", "4", "--every",
           "2", "--size", "5000"]
    out = subprocess.run([sys.executable, "-m", "mpiburst", "run", "--id", "r3", "--nodes", "3", "--channels", "6",
                          "--capacity", "64M", "--bfs-root", str(bfs), "--", *app], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    assert "started the tier of run r3 on 3 nodes" in out.stderr and "stopped the tier of run r3" in out.stderr
    assert (bfs / "sim/result.bin").read_bytes() == expected_file(6, 5000, 4)
    pids = [int(p) for p in re.search(r"on 3 nodes \(PIDs ([\d, ]+),", out.stderr).group(1).split(", ")]
    assert len(set(pids)) == 3 and not any(server.pid_alive(p) for p in pids)
    left = sorted(n for n in os.listdir(tmp_path) if ".report." not in n)  # run writes its I/O report beside
    assert server_pids_in(tmp_path) == [] and left == ["bfs", "mpiburst_r3.stats.json"]  # and the saved statistics
    files = json.loads((tmp_path / "mpiburst_r3.report.json").read_text())["files"]
    (result,) = [f for f in files if f["path"] == str((bfs / "sim/result.bin").resolve())]
    assert sorted(result["processes"]) == [f"rank {r}" for r in range(6)]  # the ranks of all 3 nodes
    assert (result["app"]["write"]["calls"], result["app"]["write"]["bytes"]) == (6, len(expected_file(6, 5000, 4)))


def test_engine_relieves_the_fullest_server(tmp_path, three_nodes):
    """Node 2 over the sync threshold, the cluster as a whole far below it: the engine syncs node 2's file."""
    import logging

    from mpiburst.engine import Engine

    bfs = tmp_path / "bfs"
    conf = three_nodes("ce", capacity="16M")
    writer = Tier._attach(conf, node=2)
    data = os.urandom(9 << 20)
    with mpiburst.open("burst://big", "wb", tier=writer) as f:
        f.write(data)
    writer.disconnect()
    tier = Tier.connect(conf=conf)
    engine = Engine(tier, logging.getLogger("test"))
    used, cap = engine.memory()
    total_used, total_cap = tier.store.memory()
    assert used / cap >= conf.sync_threshold > total_used / total_cap  # only node 2 is over the threshold
    engine.thresholds()
    assert (bfs / "big").read_bytes() == data
    tier.disconnect()


def _start_nodes(tmp_path: Path, server_binary: str, nodes: list[int], count: int = 3, timeout: str = "60",
                 run_id: str = "pn") -> list[subprocess.Popen]:
    """Run 'mpiburst start --nodes COUNT --node K' for each K of ``nodes`` at once (as each node's prolog does)."""
    env = job_env(server_binary, MPIBURST_RANKS_PER_NODE="2")
    return [subprocess.Popen([sys.executable, "-m", "mpiburst", "start", "--id", run_id, "--dir", str(tmp_path),
                              "--capacity", "64M", "--channels", "6", "--bind", "127.0.0.1", "--nodes", str(count),
                              "--node", str(k), "--join-timeout", timeout], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for k in nodes]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Wait for each process; return its exit status, stdout and stderr."""
    outputs = [p.communicate(timeout=150) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs)]


@pytest.mark.slow
def test_nodes_started_one_at_a_time_form_one_cluster(tmp_path, server_binary, cli, server_pids_in):
    """Each node's 'start --nodes 3 --node K' on its own, node 0 last: one cluster, each node's 0600 files."""
    done = _finish(_start_nodes(tmp_path, server_binary, [2, 1]) + _start_nodes(tmp_path, server_binary, [0]))
    assert [d[0] for d in done] == [0, 0, 0], done
    conf = RunConf.load(str(tmp_path / "mpiburst_pn.conf"))
    assert [n["ranks"] for n in conf.nodes] == [[0, 2], [2, 4], [4, 6]] and conf.engine_pid
    assert [f"MPIBURST_PID={n['pid']}" in d[1] for n, d in zip(conf.nodes, done[::-1])] == [True] * 3
    for k in range(3):
        assert (tmp_path / f"mpiburst_pn@{k}.node").stat().st_mode & 0o777 == 0o600
    for k in range(3):  # a store of every node sees what node k wrote
        tier = Tier._attach(conf, node=k)
        with mpiburst.open(f"burst://f{k}", "wb", tier=tier) as f:
            f.write(_payload(k))
        tier.disconnect()
    assert cli("stage-out", "--id", "pn", "--dir", str(tmp_path)).returncode == 0
    assert [(tmp_path / f"f{k}").read_bytes() == _payload(k) for k in range(3)] == [True] * 3
    out = cli("stop", "--id", "pn", "--dir", str(tmp_path))
    assert out.returncode == 0 and "3 servers" in out.stderr, out.stderr
    assert not list(tmp_path.glob("*.node")) and not list(tmp_path.glob("mpiburst_pn.*conf"))
    assert not server_pids_in(tmp_path)


def test_node_0_names_a_node_that_never_came_and_stops_its_server(tmp_path, server_binary, server_pids_in):
    # 10 s: node 1 must start its server and answer within it even on a loaded machine (3 s was seen too short)
    done = _finish(_start_nodes(tmp_path, server_binary, [0, 1], timeout="10"))
    code, _, err = done[0]
    assert code != 0 and "did not hear from node 2 within 10 s" in err and "Traceback" not in err, err
    assert not (tmp_path / "mpiburst_pn.conf").exists() and not (tmp_path / "mpiburst_pn.admin").exists()
    # node 1 started its server for a plan that was abandoned: its entry names it for the node's epilog
    entry = json.loads((tmp_path / "mpiburst_pn@1.node").read_text())
    assert server.pid_alive(entry["pid"]) and server_pids_in(tmp_path) == [entry["pid"]]
    os.kill(entry["pid"], signal.SIGKILL)


def test_a_node_without_node_0s_plan_gives_up_and_leaves_nothing(tmp_path, server_binary, server_pids_in):
    code, _, err = _finish(_start_nodes(tmp_path, server_binary, [1], timeout="2"))[0]
    assert code != 0 and "node 1 of run pn found no plan" in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir()) and not server_pids_in(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "3"], "give both --nodes N and --node K"),
    (["--nodes", "3", "--node", "3"], "node 3 of 3 is not a node"),
    (["--nodes", "1", "--node", "0"], "node 0 of 1 is not a node"),
    (["--nodes", "2", "--node", "0", "--foreground"], "leave out --foreground"),
])
def test_start_node_options_are_checked(args, message, cli, tmp_path):
    out = cli("start", "--id", "pn", *args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())


def _node_keys(conf: RunConf) -> list[int]:
    """The number of keys each node's server holds."""
    counts = []
    for k in range(len(conf.nodes)):
        client = server.connect_redis(conf.node(k))
        try:
            counts.append(client.dbsize())
        finally:
            client.close()
    return counts


@pytest.mark.slow
def test_a_multi_node_run_saved_restarts_with_every_byte_and_commits(run, cli, server_pids_in, tmp_path):
    """stop --save: each node saves its own snapshot (0600); start --restart brings the 3 nodes back, each
    holding its own data again; the bytes read back exact and a stage-out commits them to the BFS."""
    keys = _node_keys(run)
    assert all(keys)
    out = cli("stop", "--save", "--id", "cc", "--dir", run.dir)
    assert out.returncode == 0 and "each node's snapshot saved" in out.stderr, out.stderr
    snapshots = sorted(tmp_path.glob("redis_cc@*.rdb"))
    assert [p.name for p in snapshots] == [f"redis_cc@{k}.rdb" for k in range(3)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in snapshots)
    assert server_pids_in(tmp_path) == [] and not (tmp_path / "mpiburst_cc.admin").exists()
    kept = RunConf.load(run.path)
    assert kept.pid is None and [n["pid"] for n in kept.nodes] == [None] * 3
    refused = cli("start", "--id", "cc", "--dir", run.dir)
    assert refused.returncode != 0 and "has a saved snapshot" in refused.stderr and "--restart" in refused.stderr
    again = cli("start", "--restart", "--id", "cc", "--dir", run.dir)
    assert again.returncode == 0, again.stderr
    conf = RunConf.load(run.path)
    assert len(conf.nodes) == 3 and all(server.pid_alive(n["pid"]) for n in conf.nodes)
    assert _node_keys(conf) == keys   # every node got its own snapshot back
    tier = Tier.connect(conf=conf)
    try:
        for k in range(3):
            with mpiburst.open(f"burst://f{k}", "rb", tier=tier) as f:
                assert f.read() == _payload(k)
        with mpiburst.open("burst://shared", "rb", tier=tier) as f:
            assert f.read() == b"".join(_payload(k) for k in range(3))
    finally:
        tier.disconnect()
    out = cli("stage-out", "--id", "cc", "--dir", run.dir)
    assert out.returncode == 0, out.stderr
    bfs = Path(conf.bfs_root)
    assert [(bfs / f"f{k}").read_bytes() == _payload(k) for k in range(3)] == [True] * 3
    assert (bfs / "shared").read_bytes() == b"".join(_payload(k) for k in range(3))
    assert cli("stop", "--discard", "--id", "cc", "--dir", run.dir).returncode == 0
    assert server_pids_in(tmp_path) == [] and not list(tmp_path.glob("redis_cc*")) and not Path(run.path).exists()


def test_save_with_a_node_down_stops_nothing_and_says_so(run, cli, tmp_path):
    os.kill(run.nodes[2]["pid"], signal.SIGKILL)
    out = cli("stop", "--save", "--id", "cc", "--dir", run.dir)
    assert out.returncode != 0 and "node 2 of run cc is down" in out.stderr and "Traceback" not in out.stderr
    assert all(server.pid_alive(run.nodes[k]["pid"]) for k in (0, 1)) and not list(tmp_path.glob("*.rdb"))


def test_a_saved_run_restarts_only_on_its_node_count(run, cli, server_binary, tmp_path):
    assert cli("stop", "--save", "--id", "cc", "--dir", run.dir).returncode == 0
    with pytest.raises(mpiburst.errors.ConfigError, match="was saved on 3 nodes; restart it on 3 nodes"):
        server.start_cluster(nodes=2, id="cc", dir=run.dir, restart=True, server=server_binary)
    assert len(list(tmp_path.glob("redis_cc@*.rdb"))) == 3 and Path(run.path).exists()
    out = cli("stop", "--id", "cc", "--dir", run.dir)
    assert out.returncode != 0 and "is not running (its 3 snapshots" in out.stderr
    assert cli("stop", "--discard", "--id", "cc", "--dir", run.dir).returncode == 0
    assert not list(tmp_path.glob("redis_cc*")) and not Path(run.path).exists()


@pytest.mark.slow
def test_mpiburst_run_on_three_nodes_retains_a_failed_job_and_the_next_run_finishes_it(tmp_path, server_binary,
                                                                                      server_pids_in):
    """A failing job on 3 nodes is retained (a snapshot per node); the next 'run' with the same ID reloads it on
    3 nodes, its ranks find their checkpoint, and on success the BFS gets the data."""
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = job_env(server_binary, MPIBURST_NODE_LAUNCH=f"{mpiexec} -n 3", MPIBURST_RANKS_PER_NODE="2")
    app = [mpiexec, "-n", "6", sys.executable, str(EXAMPLES / "checkpoint_restart.py"), "--every", "2", "--size", "5000"]

    def run_job(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mpiburst", "run", "--id", "rr", "--nodes", "3", "--channels", "6",
                               "--capacity", "64M", "--bfs-root", str(bfs), "--", *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=150)

    first = run_job(*app, "--steps", "6", "--fail-at", "4")
    assert first.returncode == 1 and "simulated crash after step 4" in first.stdout, first.stderr
    assert "its data is saved in 3 node snapshots" in first.stderr, first.stderr
    assert len(list(tmp_path.glob("redis_rr@*.rdb"))) == 3 and not (bfs / "sim").exists()
    assert server_pids_in(tmp_path) == []
    second = run_job(*app, "--steps", "6")
    assert second.returncode == 0, second.stderr
    assert "reloading the data run rr saved in 3 node snapshots" in second.stderr
    assert "resuming from step 4 on 6 ranks" in second.stdout, second.stdout
    assert (bfs / "sim/result.bin").read_bytes() == expected_file(6, 5000, 6)
    assert server_pids_in(tmp_path) == [] and not list(tmp_path.glob("redis_rr*")) and not (tmp_path / "mpiburst_rr.conf").exists()


@pytest.mark.slow
def test_mpiburst_run_with_replicas_commits_what_survives_node_0_killed_after_the_job(tmp_path, server_binary,
                                                                                      server_pids_in):
    """'mpiburst run --nodes 3 --replicas 1': the job writes its result, then node 0's server (every file's record)
    is killed before the stage-out; node 0's replica is promoted, and the stage-out commits every byte from it."""
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = job_env(server_binary, MPIBURST_NODE_LAUNCH=f"{mpiexec} -n 3", MPIBURST_RANKS_PER_NODE="2")
    app = f"{mpiexec} -n 6 {sys.executable} {EXAMPLES / 'checkpoint_restart.py'} --steps 2 --every 2 --size 5000"
    kill = ("import json, os, signal; "
            "os.kill(json.load(open(os.environ['MPIBURST_CONF']))['nodes'][0]['pid'], signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-m", "mpiburst", "run", "--id", "rk", "--nodes", "3", "--replicas", "1",
                          "--channels", "6", "--capacity", "64M", "--bfs-root", str(bfs), "--",
                          "sh", "-c", f"{app} && {sys.executable} -c \"{kill}\""],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    assert "died" not in out.stderr and "stopped the tier of run rk" in out.stderr
    assert (bfs / "sim/result.bin").read_bytes() == expected_file(6, 5000, 2)
    assert server_pids_in(tmp_path) == [] and not list(tmp_path.glob("redis_rk*"))
