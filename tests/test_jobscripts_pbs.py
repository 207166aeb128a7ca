"""The PBS / Torque scripts of ``jobscripts/pbs/``, run with bash and PBS's variables set (no PBS server here).

The job scripts run real MPI ranks (``mpiexec`` from the venv on the slots of
a ``PBS_NODEFILE``) and a real server; outputs are checked byte for byte on
the BFS, and the server PID the log names must be gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, REPO, _server_pids_in, expected_file, job_env, processes_gone, server_pids_logged
from mpiburst import server

SCRIPTS = REPO / "jobscripts" / "pbs"

# The server is this file's medium, not its subject: its tests run with the first engine only (docs/ci.md).
pytestmark = pytest.mark.workflow



def pbs_env(tmp_path: Path, server_binary: str, slots: int, **extra: str) -> dict:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\n" * slots)
    return job_env(server_binary, PBS_JOBID="123.pbs-server", PBS_O_WORKDIR=str(tmp_path),
                   PBS_NODEFILE=str(nodefile), **extra)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pbs_mpi_job(tmp_path: Path, server_binary: str) -> None:
    (tmp_path / "job.policy").write_text("SYNC sim/\nPURGE sim/ckpt_*\n")
    app = f"python {EXAMPLES / 'checkpoint_restart.py'} --steps 6 --every 3 --size 3000"
    done = subprocess.run(["bash", SCRIPTS / "mpi_job.pbs"], cwd="/", capture_output=True, text=True, timeout=150,
                          env=pbs_env(tmp_path, server_binary, 2, APP=app))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "sim/result.bin").read_bytes() == expected_file(2, 3000, 6)
    assert (tmp_path / "sim/ckpt_000003.bin").read_bytes() == expected_file(2, 3000, 3)   # PURGE: on the BFS
    assert "purge" in done.stderr and "2 channels" in done.stderr
    pids = server_pids_logged(done.stderr)
    assert len(pids) == 1 and not server.pid_alive(pids[0])
    assert not (tmp_path / "mpiburst_123.pbs-server.conf").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pbs_mpi_job_failure_keeps_data_for_stage_out(tmp_path: Path, server_binary: str, cli) -> None:
    app = f"python {EXAMPLES / 'checkpoint_restart.py'} --steps 6 --every 2 --size 100 --fail-at 5"
    env = pbs_env(tmp_path, server_binary, 2, APP=app)
    done = subprocess.run(["bash", SCRIPTS / "mpi_job.pbs"], capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode != 0
    assert (tmp_path / "redis_123.pbs-server.rdb").exists() and not (tmp_path / "sim").exists()
    out = cli("stage-out", "--id", "123.pbs-server")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sim/ckpt_000004.bin").read_bytes() == expected_file(2, 100, 4)
    assert np.frombuffer((tmp_path / "sim/latest").read_bytes(), dtype=np.int64)[0] == 4
    assert processes_gone(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pbs_many_tasks(tmp_path: Path, server_binary: str) -> None:
    # 4 tasks on 3 channels: worker 0 stores twice (tasks 0 and 3) into its channel, one after the other
    env = pbs_env(tmp_path, server_binary, 3, NTASKS="4", TASKS_SCRIPT=str(EXAMPLES / "many_small_tasks.sh"))
    done = subprocess.run(["bash", SCRIPTS / "many_tasks.pbs"], capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr
    for w in range(3):
        expected = "".join(f"task {i}: square {i * i}\n" for i in range(w, 4, 3))
        assert (tmp_path / f"results/data_123.pbs-server_{w}.dat").read_text() == expected
    assert processes_gone(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pbs_prologue_epilogue(tmp_path: Path, server_binary: str) -> None:
    (tmp_path / "bfs").mkdir()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, timeout=10).stdout.strip()
    env = pbs_env(tmp_path, server_binary, 2, MPIBURST_SITE_DIR=str(tmp_path / "s"),
                  MPIBURST_BFS_ROOT=str(tmp_path / "bfs"), MPIBURST_CAPACITY="128M",
                  MPIBURST_SITE_CONF=str(tmp_path / "none.sh"))
    job = "77.pbs"   # site dir + ID twice in the socket path must stay under 108 bytes
    assert subprocess.run(["bash", SCRIPTS / "prologue", job, user, user], env=env, timeout=120).returncode == 0
    conf = tmp_path / "s" / job / f"mpiburst_{job}.conf"
    data = json.loads(conf.read_text())
    assert data["channels"] == 2 and server.pid_alive(data["pid"])
    writer = (f"import mpiburst.writeback as c, mpiburst.tier as t, os; tier = t.Tier.current(); "
              f"p = os.path.join(tier.bfs_root, 'pbs.dat'); f = c.TierFile(tier, p, 1); f.store.create(p, None); "
              f"f.write(0, memoryview(b'pbs!' * 4096)); f.push()")
    subprocess.run([sys.executable, "-c", writer], env=dict(env, MPIBURST_CONF=str(conf)), check=True, timeout=60)
    assert subprocess.run(["bash", SCRIPTS / "epilogue", job, user, user], env=env, timeout=120).returncode == 0
    assert (tmp_path / "bfs/pbs.dat").read_bytes() == b"pbs!" * 4096
    assert not server.pid_alive(data["pid"]) and not conf.exists()
    for pid in _server_pids_in(tmp_path):   # safety net only; the assertion above is the test
        os.kill(pid, 9)


def test_pbs_scripts_are_valid_bash() -> None:
    for script in sorted(SCRIPTS.iterdir()):
        assert subprocess.run(["bash", "-n", script], timeout=10).returncode == 0, script
