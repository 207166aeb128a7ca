"""The I/O report of a multi-node run (#18 on #15): statistics saved at stop, traffic of every node.

Three cluster-mode servers on this machine (:func:`mpiburst.server.start_cluster`);
each node's I/O goes through a tier attached as that node, as its ranks' does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat

import pytest

import mpiburst
from mpiburst import server
from mpiburst.engine import Engine
from mpiburst.server.process import wait_gone
from mpiburst.runconf import RunConf
from mpiburst.tier import Tier

pytestmark = pytest.mark.timeout(180)

WRITE = 4096


@pytest.fixture
def run(three_nodes):
    """A 3-node run whose node ``k`` wrote ``n<k>.dat`` in ``10 * (k + 1)`` writes of 4 KiB."""
    conf = three_nodes("rc")
    for k in range(3):
        tier = Tier._attach(conf, node=k)
        with mpiburst.open(f"burst://n{k}.dat", "wb", tier=tier) as f:
            for _ in range(10 * (k + 1)):
                f.write(bytes([k]) * WRITE)
        tier.disconnect()
    return RunConf.load(conf.path)


def test_report_after_a_multi_node_stop_reads_the_saved_statistics(run, cli, tmp_path):
    report = server.stop_run(run)
    assert "stopped: 3 servers" in report and not any(server.pid_alive(n["pid"]) for n in run.nodes)
    saved = tmp_path / "mpiburst_rc.stats.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    out = tmp_path / "r.json"
    proc = cli("report", "--id", "rc", "--dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    files = {os.path.basename(f["path"]): f for f in json.loads(out.read_text())["files"]}
    assert sorted(files) == ["n0.dat", "n1.dat", "n2.dat"]
    for k in range(3):
        w = files[f"n{k}.dat"]["app"]["write"]
        assert (w["calls"], w["bytes"], w["consecutive"]) == (10 * (k + 1), 10 * (k + 1) * WRITE, 10 * (k + 1))  # from 0 on


def test_a_stop_with_node_0_down_saves_the_other_nodes_statistics_and_the_report_says_what_is_missing(
        run, cli, tmp_path):
    """Each node holds its processes' counters: with node 0's server killed, nodes 1 and 2's survive the stop."""
    os.kill(run.nodes[0]["pid"], signal.SIGKILL)
    assert wait_gone(run.nodes[0]["pid"], None, 10)
    assert "node 0 had already ended" in server.stop_run(run)
    saved = tmp_path / "mpiburst_rc.stats.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    out = tmp_path / "r.json"
    proc = cli("report", "--id", "rc", "--dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "incomplete: the server of node 0 was down when the run stopped" in proc.stdout
    data = json.loads(out.read_text())
    assert data["missing_nodes"] == [0]
    files = {os.path.basename(f["path"]): f for f in data["files"]}
    assert sorted(files) == ["n1.dat", "n2.dat"]                      # node 0's process wrote n0.dat
    for k in (1, 2):
        w = files[f"n{k}.dat"]["app"]["write"]
        assert (w["calls"], w["bytes"]) == (10 * (k + 1), 10 * (k + 1) * WRITE)


def test_the_engine_fill_sample_sums_the_traffic_of_every_node(run):
    tier = Tier.connect(conf=run)
    try:
        engine = Engine(tier, logging.getLogger("test-engine"))
        engine.sample(force=True)
        before = [e for e in tier.store.stats()[1] if e["kind"] == "fill"][-1]
        big = os.urandom(4 << 20)
        writer = Tier._attach(run, node=2)     # 4 MiB into node 2's server only
        with mpiburst.open("burst://big.dat", "wb", tier=writer) as f:
            f.write(big)
        writer.disconnect()
        engine.sample(force=True)
        after = [e for e in tier.store.stats()[1] if e["kind"] == "fill"][-1]
        assert after["net_in"] - before["net_in"] >= len(big)
        assert after["net_in"] >= 60 * WRITE   # the fixture's writes, on all three nodes
    finally:
        tier.disconnect()


def test_status_watch_counts_the_traffic_of_every_node(run):
    """``status --watch``'s in/out rates are the whole tier's: bytes written into node 2 count (Store.traffic)."""
    from mpiburst.cli import watch

    tier = Tier.connect(conf=run)          # the CLI's view: a process on no node
    try:
        before = watch.sample(tier)
        big = os.urandom(4 << 20)
        writer = Tier._attach(run, node=2)
        with mpiburst.open("burst://w.dat", "wb", tier=writer) as f:
            f.write(big)
        writer.disconnect()
        after = watch.sample(tier)
        assert after["in"] - before["in"] >= len(big)
        assert after["used"] >= before["used"] + len(big) // 2
    finally:
        tier.disconnect()
