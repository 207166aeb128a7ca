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
