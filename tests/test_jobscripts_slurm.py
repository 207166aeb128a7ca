"""The Slurm scripts of ``jobscripts/slurm/`` submitted to a real one-node Slurm (``tests/slurm_cluster.py``).

Each job runs with the repository's venv (``MPIBURST_PYTHON``, PATH) and a
BFS in the test's directory; after it ends, its output files are compared
byte for byte with what the program must have written, and the server PID
the job's log names must be gone. The prolog / epilog scripts are run
directly with Slurm's variables set (configuring them in the test cluster's
slurm.conf would change a shared file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import (EXAMPLES, REPO, _server_pids_in, cli_env, expected_file, expected_state, heat_state,  # noqa: F401
                      job_env, processes_gone, server_pids_logged)
from mpiburst import server

SCRIPTS = REPO / "jobscripts" / "slurm"

# The server is this file's medium, not its subject: its tests run with the first engine only (docs/ci.md).
pytestmark = pytest.mark.workflow


@pytest.fixture(scope="session")   # a test process joins the cluster once and leaves at its end
def slurm():
    from slurm_cluster import cluster

    with cluster() as c:
        yield c


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_mpi_job_stages_in_runs_and_stages_out(slurm, tmp_path: Path, server_binary: str) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input/params.txt").write_text("steps=9\n")
    (tmp_path / "job.policy").write_text("IN input/\nSYNC sim/\nDISCARD sim/ckpt_*\n")
    app = f"python {EXAMPLES / 'checkpoint_restart.py'} --steps 9 --every 3 --size 5000"
    job = slurm.submit(SCRIPTS / "mpi_job.sbatch", cwd=tmp_path, env=job_env(server_binary, APP=app),
                       extra_args=("-n", "2", "-o", "job.out"))
    result = slurm.wait(job, timeout=240)
    log = (tmp_path / "job.out").read_text()
    assert result == ("COMPLETED", 0, 0), log
    assert (tmp_path / "sim/result.bin").read_bytes() == expected_file(2, 5000, 9)
    assert (tmp_path / "sim/latest").read_bytes() == np.array([9], dtype=np.int64).tobytes()
    assert not list((tmp_path / "sim").glob("ckpt_*"))          # DISCARD removed them from the BFS
    assert f"in       {tmp_path / 'input/params.txt'}" in log      # staged in
    pids = server_pids_logged(log)
    assert len(pids) == 1 and not server.pid_alive(pids[0])
    assert not (tmp_path / f"mpiburst_{job}.conf").exists() and processes_gone(tmp_path)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_many_small_tasks_job(slurm, tmp_path: Path, server_binary: str) -> None:
    # 3 tasks on 2 channels (-c 2): worker 0 stores twice (tasks 0 and 2) into its channel, one after the other
    env = job_env(server_binary, NTASKS="3", TASKS_SCRIPT=str(EXAMPLES / "many_small_tasks.sh"))
    job = slurm.submit(SCRIPTS / "many_tasks.sbatch", cwd=tmp_path, env=env,
                       extra_args=("-c", "2", "-o", "tasks.out"))
    result = slurm.wait(job, timeout=240)
    log = (tmp_path / "tasks.out").read_text()
    assert result == ("COMPLETED", 0, 0), log
    for w in range(2):
        expected = "".join(f"task {i}: square {i * i}\n" for i in range(w, 3, 2))
        assert (tmp_path / f"results/data_{job}_{w}.dat").read_text() == expected
    pids = server_pids_logged(log)
    assert len(pids) == 1 and not server.pid_alive(pids[0])


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_time_limit_commit_with_signal(slurm, tmp_path: Path, server_binary: str) -> None:
    """--time=2 with --signal=B:USR1@40: the commit lands checkpoints on the BFS before the limit kills the job.

    Slurm may send the signal up to 60 s before the time asked (sbatch(1), --signal) and checks
    every 30 s: with --time=1 it once came at the job's start, before any checkpoint (and before the
    batch shell's trap). With --time=2 it comes 20 to 110 s after the start, before the limit.
    """
    app = f"python {EXAMPLES / 'checkpoint_restart.py'} --steps 100000 --every 2 --size 1000 --step-time 0.5"
    job = slurm.submit(SCRIPTS / "time_limit.sbatch", cwd=tmp_path, env=job_env(server_binary, APP=app),
                       extra_args=("-n", "2", "--time=2", "--signal=B:USR1@40", "-o", "limit.out"))
    result = slurm.wait(job, timeout=200)
    log = (tmp_path / "limit.out").read_text()
    assert result.state == "TIMEOUT", log
    assert "SIGUSR1: committing" in log
    # The committed checkpoint named by 'latest' is complete and exact on the BFS.
    latest = int(np.frombuffer((tmp_path / "sim/latest").read_bytes(), dtype=np.int64)[0])
    assert latest >= 2 and latest % 2 == 0
    assert (tmp_path / f"sim/ckpt_{latest:06d}.bin").read_bytes() == expected_file(2, 1000, latest)
    pids = server_pids_logged(log)
    assert len(pids) == 1 and not server.pid_alive(pids[0])
    assert processes_gone(tmp_path)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_checkpoints_stop_before_the_time_limit_with_the_last_one_on_the_bfs(slurm, tmp_path: Path,
                                                                              server_binary: str) -> None:
    """--time=1, no signal: should_exit() reads Slurm's end time and the job ends itself, its last checkpoint durable."""
    from mpiburst.checkpoint import Catalog

    app = (f"python {EXAMPLES / 'heat_ckpt.py'} --steps 100000 --every 2 --points 2000 --flush-every 1000 "
           "--step-time 0.5")
    job = slurm.submit(SCRIPTS / "checkpoint.sbatch", cwd=tmp_path, env=job_env(server_binary, APP=app),
                       extra_args=("-n", "2", "--time=1", "-o", "ckpt.out"))
    result = slurm.wait(job, timeout=200)
    log = (tmp_path / "ckpt.out").read_text()
    assert result.state == "COMPLETED", log                       # it stopped itself: no TIMEOUT
    stop = re.search(r"stopping after checkpoint (\d+): the job's time limit is (\d+) s away", log)
    assert stop, log
    step = int(stop.group(1))
    found = Catalog("heat", bfs_root=str(tmp_path)).scan()        # the BFS alone: the job's tier is gone
    assert max(found) == step and found[step].on_bfs
    assert np.array_equal(np.fromfile(tmp_path / f"heat/ckpt.{step}/u.dat"), heat_state(2000, step))
    pids = server_pids_logged(log)
    assert len(pids) == 1 and not server.pid_alive(pids[0])


@pytest.fixture
def site(tmp_path: Path, server_binary: str) -> Iterator[dict]:
    """Environment of a prolog/epilog call: job 990001 of this user, BFS under tmp_path.

    The site dir is a short directory under /tmp, not under tmp_path: the run's socket in
    ``<site>/990001/.mpiburst_990001/`` must stay under the OS's 107 bytes whatever the length of
    the user's name and of pytest's ``/tmp/pytest-of-<user>/pytest-<N>/`` (108 bytes failed a
    newcomer's second run).
    """
    (tmp_path / "bfs").mkdir()
    site_dir = Path(tempfile.mkdtemp(prefix="site-", dir="/tmp"))
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, timeout=10).stdout.strip()
    env = job_env(server_binary, SLURM_JOB_ID="990001", SLURM_JOB_USER=user, SLURM_NTASKS="2",
                  MPIBURST_SITE_DIR=str(site_dir), MPIBURST_BFS_ROOT=str(tmp_path / "bfs"), MPIBURST_CAPACITY="128M",
                  MPIBURST_SITE_CONF=str(tmp_path / "none.sh"))
    yield env
    for pid in _server_pids_in(tmp_path) + _server_pids_in(site_dir):
        os.kill(pid, 9)
    shutil.rmtree(site_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_prolog_job_epilog(site: dict, tmp_path: Path) -> None:
    run_dir = Path(site["MPIBURST_SITE_DIR"]) / "990001"
    assert subprocess.run(["bash", SCRIPTS / "prolog.sh"], env=site, timeout=120).returncode == 0
    conf = run_dir / "mpiburst_990001.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    pid = json.loads(conf.read_text())["pid"]
    assert server.pid_alive(pid)
    exports = subprocess.run(["bash", SCRIPTS / "task_prolog.sh"], env=site, capture_output=True, text=True,
                             timeout=30).stdout
    assert f"export MPIBURST_CONF={conf}" in exports
    # the job: joins the prolog's tier through MPIBURST_CONF, writes and exits with an error (not staged out)
    job_env_ = dict(site, MPIBURST_CONF=str(conf))
    code = (f"import mpiburst.writeback as c, mpiburst.tier as t, os; tier = t.Tier.current(); "
            f"p = os.path.join(tier.bfs_root, 'out.dat'); f = c.TierFile(tier, p, 0); f.store.create(p, None); "
            f"f.write(0, memoryview(b'epilog' * 999)); f.push()")
    done = subprocess.run([sys.executable, "-m", "mpiburst", "run", "--dir", str(run_dir), "--id", "990001", "--",
                           sys.executable, "-c", code + "; raise SystemExit(4)"], env=job_env_, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 4 and "joined the running tier" in done.stderr, done.stderr
    assert server.pid_alive(pid) and not (tmp_path / "bfs/out.dat").exists()   # left to the epilog
    assert subprocess.run(["bash", SCRIPTS / "epilog.sh"], env=site, timeout=120).returncode == 0
    assert (tmp_path / "bfs/out.dat").read_bytes() == b"epilog" * 999
    assert not server.pid_alive(pid) and not conf.exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_epilog_kills_a_server_that_will_not_stop(site: dict, tmp_path: Path) -> None:
    assert subprocess.run(["bash", SCRIPTS / "prolog.sh"], env=site, timeout=120).returncode == 0
    conf = Path(site["MPIBURST_SITE_DIR"]) / "990001/mpiburst_990001.conf"
    pid = json.loads(conf.read_text())["pid"]
    os.kill(pid, 19)       # SIGSTOP: the server can no longer answer stage-out or stop
    try:
        env = dict(site, MPIBURST_STAGEOUT_TIMEOUT="3")
        assert subprocess.run(["bash", SCRIPTS / "epilog.sh"], env=env, timeout=200).returncode == 0
        assert not server.pid_alive(pid)
        assert "killing it" in (conf.parent / "epilog.log").read_text()
    finally:
        if server.pid_alive(pid):
            os.kill(pid, 9)


def test_scripts_are_valid_bash() -> None:
    for script in sorted(SCRIPTS.iterdir()):
        assert subprocess.run(["bash", "-n", script], timeout=10).returncode == 0, script


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", ["mpi_job.sbatch", "multi_node.sbatch"])
def test_mpi_job_on_simulated_nodes_gets_one_server_per_node(slurm, tmp_path: Path, server_binary: str,
                                                             script: str) -> None:
    """A job script on '3 nodes' (6 ranks, MPIBURST_RANKS_PER_NODE=2): three servers, one cluster, all stopped."""
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    app = f"python {EXAMPLES / 'checkpoint_restart.py'} --steps 4 --every 2 --size 5000"
    env = job_env(server_binary, APP=app, MPIBURST_NODES="3", MPIBURST_RANKS_PER_NODE="2",
                  MPIBURST_NODE_LAUNCH=f"{mpiexec} -launcher fork -n 3",
                  LAUNCH=f"{mpiexec} -launcher fork -n 6")  # one machine: no srun steps for the "nodes"
    job = slurm.submit(SCRIPTS / script, cwd=tmp_path, env=env,
                       extra_args=("-N", "1", "-n", "6", "--overcommit", "-o", "job.out"))
    result = slurm.wait(job, timeout=240)
    log = (tmp_path / "job.out").read_text()
    assert result == ("COMPLETED", 0, 0), log
    assert (tmp_path / "sim/result.bin").read_bytes() == expected_file(6, 5000, 4)
    pids = [int(p) for p in re.search(r"on 3 nodes \(PIDs ([\d, ]+),", log).group(1).split(", ")]
    assert len(set(pids)) == 3 and not any(server.pid_alive(p) for p in pids)
    assert not (tmp_path / f"mpiburst_{job}.conf").exists() and processes_gone(tmp_path)


@pytest.fixture
def shared() -> Iterator[Path]:
    """The site's shared directory: short, under /tmp (as ``site``'s, so every node's socket path fits)."""
    path = Path(tempfile.mkdtemp(prefix="shared-", dir="/tmp"))
    yield path
    for pid in _server_pids_in(path):
        os.kill(pid, 9)
    shutil.rmtree(path, ignore_errors=True)


def _site_nodes_env(tmp_path: Path, shared: Path, server_binary: str, job: str, **extra: str) -> dict:
    """Environment of a prolog/epilog call of a 3-node job simulated on this host (MPIBURST_NODES=3)."""
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, timeout=10).stdout.strip()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, timeout=10).stdout.strip()
    return job_env(server_binary, SLURM_JOB_ID=job, SLURM_JOB_USER=user, SLURM_NTASKS="6", SLURM_JOB_NODELIST=host,
                   MPIBURST_NODES="3", MPIBURST_RANKS_PER_NODE="2", MPIBURST_SITE_DIR=str(tmp_path / "site"),
                   MPIBURST_SHARED_DIR=str(shared), MPIBURST_BFS_ROOT=str(tmp_path / "bfs"),
                   MPIBURST_CAPACITY="128M", MPIBURST_SITE_CONF=str(tmp_path / "none.sh"), **extra)


def _on_every_node(script: str, env: dict, nodes: int = 3, timeout: float = 240, first: int = 0) -> None:
    """Run ``script`` once per simulated node (``nodes`` of them from ``first``), all at once (as slurmd runs a
    job's prologs / epilogs)."""
    procs = [subprocess.Popen(["bash", str(SCRIPTS / script)], env=dict(env, MPIBURST_NODE_INDEX=str(k)))
             for k in range(first, first + nodes)]
    try:
        assert [p.wait(timeout=timeout) for p in procs] == [0] * nodes   # a failing prolog/epilog drains the node
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_prolog_on_every_node_gives_one_cluster_the_job_commits_and_the_epilogs_leave_nothing(
        slurm, tmp_path: Path, shared: Path, server_binary: str) -> None:
    """The multi-node site variant on 3 simulated nodes: the prolog runs on each node at once, each starts its
    node's server and node 0 forms the cluster; a real Slurm job (mpi_job.sbatch, 6 ranks, 2 per node) joins it
    through MPIBURST_CONF and commits; the epilogs, at once, stop every server and leave no secret file."""
    (tmp_path / "bfs").mkdir()
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    app = f"python {EXAMPLES / 'checkpoint_restart.py'} --steps 4 --every 2 --size 5000"
    # The job runs the task prolog itself, as slurm.conf's TaskProlog would (the test cluster configures none).
    script = tmp_path / "job.sbatch"
    script.write_text(f'#!/bin/bash\neval "$(bash {SCRIPTS / "task_prolog.sh"})"\nexec bash {SCRIPTS / "mpi_job.sbatch"}\n')
    user_env = _site_nodes_env(tmp_path, shared, server_binary, "", APP=app, LAUNCH=f"{mpiexec} -launcher fork -n 6")
    del user_env["SLURM_JOB_ID"], user_env["SLURM_JOB_NODELIST"]
    job = slurm.submit(script, cwd=tmp_path, env=user_env,
                       extra_args=("-n", "6", "--overcommit", "--hold", "-o", "job.out"))
    try:
        site = _site_nodes_env(tmp_path, shared, server_binary, job)
        _on_every_node("prolog.sh", site)
        run_dir = shared / job
        conf_file = run_dir / f"mpiburst_{job}.conf"
        conf = json.loads(conf_file.read_text())
        assert len(conf["nodes"]) == 3, [p.read_text() for p in run_dir.glob("prolog*.log")]
        assert [n["ranks"] for n in conf["nodes"]] == [[0, 2], [2, 4], [4, 6]]
        pids = [n["pid"] for n in conf["nodes"]]
        assert len(set(pids)) == 3 and all(server.pid_alive(p) for p in pids)
        secrets = [conf_file, run_dir / f"mpiburst_{job}.admin", *run_dir.glob("*.node"), *run_dir.glob("redis_*.conf")]
        assert len(secrets) == 8 and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets)
        exports = subprocess.run(["bash", SCRIPTS / "task_prolog.sh"], env=dict(site, MPIBURST_NODE_INDEX="2"),
                                 capture_output=True, text=True, timeout=30).stdout
        assert f"export MPIBURST_CONF={conf_file}" in exports
        slurm.run("scontrol", "release", job)
        result = slurm.wait(job, timeout=240)
        log = (tmp_path / "job.out").read_text()
        assert result == ("COMPLETED", 0, 0), log
        assert "joined the running tier" in log and f"sync     {tmp_path / 'bfs/sim/result.bin'}" in log, log
        assert (tmp_path / "bfs/sim/result.bin").read_bytes() == expected_file(6, 5000, 4)
        # every simulated node's server absorbed its own ranks' bytes
        from mpiburst.runconf import RunConf

        whole = RunConf.load(str(conf_file))
        for k in range(3):
            client = server.connect_redis(whole.node(k))
            try:
                assert client.info("memory")["used_memory"] > 2 * 5000 * 8, k
            finally:
                client.close()
        _on_every_node("epilog.sh", site)
    finally:
        slurm.cancel(job)
        for pid in _server_pids_in(tmp_path) + _server_pids_in(shared):
            os.kill(pid, 9)
    assert not any(server.pid_alive(p) for p in pids)
    left = sorted(p.name for p in run_dir.iterdir())
    assert not [n for n in left if n.endswith((".conf", ".admin", ".node", ".rdb")) or n.startswith(".mpiburst_")], left
    assert (tmp_path / "bfs/sim/result.bin").read_bytes() == expected_file(6, 5000, 4)
    assert processes_gone(tmp_path) and processes_gone(shared)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_epilogs_of_every_node_save_each_nodes_data_when_stage_out_fails(tmp_path: Path, shared: Path,
                                                                        server_binary: str) -> None:
    """3 simulated nodes: the job's data stays in the tier, node 0's stage-out fails (a bad policy file), so
    the epilogs leave one 0600 snapshot per node and no server; 'mpiburst stage-out' then reloads and commits."""
    (tmp_path / "bfs").mkdir()
    site = _site_nodes_env(tmp_path, shared, server_binary, "990003")
    _on_every_node("prolog.sh", site)
    run_dir = shared / "990003"
    conf = run_dir / "mpiburst_990003.conf"
    pids = [n["pid"] for n in json.loads(conf.read_text())["nodes"]]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    app = subprocess.run([mpiexec, "-launcher", "fork", "-n", "6", sys.executable, str(EXAMPLES / "checkpoint_restart.py"),
                          "--steps", "4", "--every", "2", "--size", "5000"], env=dict(site, MPIBURST_CONF=str(conf)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert app.returncode == 0, app.stderr
    (run_dir / "job.policy").write_text("SYNK sim/\n")   # the epilog's stage-out refuses it
    try:
        _on_every_node("epilog.sh", dict(site, MPIBURST_STAGEOUT_TIMEOUT="60"))
        assert not any(server.pid_alive(p) for p in pids) and not (tmp_path / "bfs/sim").exists()
        snapshots = sorted(run_dir.glob("redis_990003@*.rdb"))
        assert len(snapshots) == 3 and all(p.stat().st_mode & 0o777 == 0o600 for p in snapshots)
        assert not (run_dir / "mpiburst_990003.admin").exists() and not list(run_dir.glob("*.node"))
        assert "stage-out failed; saving" in (run_dir / "epilog@0.log").read_text()
        (run_dir / "job.policy").unlink()
        out = subprocess.run([sys.executable, "-m", "mpiburst", "stage-out", "--id", "990003", "--dir", str(run_dir)],
                             env=site, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "bfs/sim/result.bin").read_bytes() == expected_file(6, 5000, 4)
    finally:
        for pid in _server_pids_in(tmp_path) + _server_pids_in(shared):
            os.kill(pid, 9)
    assert processes_gone(tmp_path) and processes_gone(shared) and not list(run_dir.glob("redis_990003@*"))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_epilog_of_a_node_with_replicas_leaves_neither_its_server_nor_the_replica_it_hosts(
        tmp_path: Path, shared: Path, server_binary: str) -> None:
    """3 simulated nodes with replicas (each hosts the previous node's replica): node 0's stop never came (its
    conf is gone); the epilogs of nodes 1 and 2 kill both servers each runs, and nothing else."""
    (tmp_path / "bfs").mkdir()
    site = _site_nodes_env(tmp_path, shared, server_binary, "990004", MPIBURST_REPLICAS="1",
                           MPIBURST_TRUST_NETWORK="1")
    _on_every_node("prolog.sh", site)
    run_dir = shared / "990004"
    conf = json.loads((run_dir / "mpiburst_990004.conf").read_text())
    assert conf["replicas"] == 1, [p.read_text() for p in run_dir.glob("prolog*.log")]
    own = [n["pid"] for n in conf["nodes"]]
    hosted = [conf["nodes"][(k - 1) % 3]["replica"]["pid"] for k in range(3)]   # node k hosts node k-1's replica
    try:
        (run_dir / "mpiburst_990004.conf").rename(run_dir / "gone.conf")   # as if node 0's stop were over
        _on_every_node("epilog.sh", site, nodes=2, first=1)
        assert not any(server.pid_alive(p) for p in own[1:] + hosted[1:])
        assert all(server.pid_alive(p) for p in (own[0], hosted[0]))   # node 0's: its own epilog's
        assert "replica" in (run_dir / "epilog@1.log").read_text()
    finally:
        for pid in _server_pids_in(tmp_path) + _server_pids_in(shared):
            os.kill(pid, 9)


PRODUCE = """import sys, mpiburst
with mpiburst.open("burst://wf/data.bin", "wb") as f:
    for k in range(40):
        f.write(bytes([k]) * 100_000)
"""
CONSUME = """import os, sys, mpiburst
on_bfs = os.path.exists(os.path.join(sys.argv[1], "wf/data.bin"))
data = mpiburst.open("burst://wf/data.bin", "rb").read()
with open(os.path.join(sys.argv[1], "consumed.bin"), "wb") as f:
    f.write(data)
print("the BFS held data.bin when the consumer read it:", on_bfs)
"""


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_producer_and_consumer_on_a_named_tier(slurm, shared: Path, server_binary: str) -> None:
    """producer.sbatch, then consumer.sbatch (afterok): the consumer reads the producer's unflushed file exactly;
    its DESTROY=flush leaves the file exact on the BFS and the tier gone."""
    (shared / "bfs").mkdir()
    for name, code in (("produce.py", PRODUCE), ("consume.py", CONSUME)):
        (shared / name).write_text(code)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = job_env(server_binary, TIER="wf", MPIBURST_TIERS_DIR=str(shared / "tiers"),
                  LAUNCH=f"{mpiexec} -launcher fork -n 1")
    made = subprocess.run([sys.executable, "-m", "mpiburst", "create", "wf", "--capacity", "64M", "--ttl", "1h"],
                          cwd=shared / "bfs", env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    producer = slurm.submit(SCRIPTS / "producer.sbatch", cwd=shared / "bfs",
                            env={**env, "APP": f"python {shared / 'produce.py'}"},
                            extra_args=("-n", "1", "-o", str(shared / "producer.out")))
    consumer = slurm.submit(SCRIPTS / "consumer.sbatch", cwd=shared / "bfs",
                            env={**env, "APP": f"python {shared / 'consume.py'} {shared / 'bfs'}", "DESTROY": "flush"},
                            extra_args=("-n", "1", f"--dependency=afterok:{producer}", "-o", str(shared / "consumer.out")))
    assert slurm.wait(producer, timeout=120) == ("COMPLETED", 0, 0), (shared / "producer.out").read_text()
    result = slurm.wait(consumer, timeout=120)
    log = (shared / "consumer.out").read_text()
    assert result == ("COMPLETED", 0, 0), log
    expected = b"".join(bytes([k]) * 100_000 for k in range(40))
    assert "the BFS held data.bin when the consumer read it: False" in log
    assert (shared / "bfs" / "consumed.bin").read_bytes() == expected
    assert (shared / "bfs" / "wf" / "data.bin").read_bytes() == expected      # destroy --flush
    assert "named tier wf is gone" in log and not (shared / "tiers" / "wf").exists()
