"""Real-Slurm tests of the CI test cluster (``.ci/slurm-cluster``) itself.

They prove what the job-script tests rely on: sbatch runs a batch script on
the one node, ``srun`` works inside it, a failing script ends FAILED with its
exit code, and ``--signal=B:USR1@N`` reaches the batch shell before the time
limit (the mechanism mpiburst's time-limit commit uses).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from slurm_cluster import SCRIPT, SlurmCluster, cluster, require_slurm

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """The test cluster, up for the whole session."""
    with cluster() as c:
        yield c


def _script(path: Path, body: str) -> Path:
    """Write an executable bash job script and return its path."""
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.mark.timeout(300)
def test_batch_job_and_srun_complete(slurm: SlurmCluster, tmp_path: Path) -> None:
    host = socket.gethostname().split(".")[0]
    ids = _script(tmp_path / "ids.sh", """\
        echo "$SLURM_JOB_ID $(hostname)" > ids.txt
        """)
    steps = _script(tmp_path / "steps.sh", """\
        srun -n 2 hostname > steps.txt
        """)

    job1 = slurm.submit(ids, cwd=tmp_path, extra_args=("-o", "ids.log"))
    job2 = slurm.submit(steps, cwd=tmp_path, extra_args=("-n", "2", "-o", "steps.log"))

    assert slurm.wait(job1, timeout=120) == ("COMPLETED", 0, 0)
    assert (tmp_path / "ids.txt").read_text() == f"{job1} {host}\n"
    assert slurm.wait(job2, timeout=120) == ("COMPLETED", 0, 0)
    assert (tmp_path / "steps.txt").read_text() == f"{host}\n{host}\n"


@pytest.mark.timeout(200)
def test_failing_script_ends_failed_with_its_exit_code(slurm: SlurmCluster,
                                                       tmp_path: Path) -> None:
    script = _script(tmp_path / "fail.sh", """\
        echo started > started.txt
        exit 7
        """)
    job = slurm.submit(script, cwd=tmp_path, extra_args=("-o", "fail.log"))
    result = slurm.wait(job, timeout=120)
    assert result == ("FAILED", 7, 0)
    assert (tmp_path / "started.txt").read_text() == "started\n"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_signal_option_warns_batch_shell_before_time_limit(slurm: SlurmCluster,
                                                           tmp_path: Path) -> None:
    # --time=1 is Slurm's smallest limit (60 s). The controller checks signal
    # deadlines every 30 s, so @50 makes USR1 arrive 10-40 s after the start:
    # well before the limit, whatever the phase of that check.
    script = _script(tmp_path / "warned.sh", """\
        start=$SECONDS
        trap 'echo "USR1 $SLURM_JOB_ID $((SECONDS - start))" > marker.txt; exit 0' USR1
        while true; do sleep 1; done
        """)
    job = slurm.submit(script, cwd=tmp_path,
                       extra_args=("--time=1", "--signal=B:USR1@50", "-o", "warned.log"))
    result = slurm.wait(job, timeout=120)

    # COMPLETED (not TIMEOUT): the trap ran and the script left on its own.
    assert result == ("COMPLETED", 0, 0)
    word, job_id, elapsed = (tmp_path / "marker.txt").read_text().split()
    assert (word, job_id) == ("USR1", job)
    assert int(elapsed) < 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_session_leaving_never_stops_the_cluster_under_another(tmp_path: Path, monkeypatch) -> None:
    """Test sessions share a machine's one cluster: it stops when the last session that uses it leaves.

    A private cluster (own directory and ports), so the machine's shared one is
    not touched: session A (a subprocess) starts it, this session B joins, A
    leaves while B still uses it, then B leaves.
    """
    require_slurm()   # here too: session A's skip (in its subprocess) would read as a failure here
    private = tempfile.mkdtemp(prefix="mpiburst-slurm-test-", dir="/tmp")   # munged (user munge) must reach it
    os.chmod(private, 0o755)
    monkeypatch.setenv("MPIBURST_SLURM_DIR", os.path.join(private, "slurm"))
    monkeypatch.setenv("MPIBURST_SLURM_PORT", "16917")

    def up() -> bool:
        return subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0

    tests = os.path.dirname(os.path.abspath(__file__))
    a = subprocess.Popen([sys.executable, "-c", "import sys; from slurm_cluster import cluster\n"
                          "with cluster():\n    print('in', flush=True); sys.stdin.readline()"],
                         cwd=tests, env=dict(os.environ, PYTHONPATH=tests), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline() == "in\n"      # A started the cluster and uses it
        with cluster() as b:
            a.communicate("leave\n", timeout=120)  # A leaves while B uses the cluster
            assert a.returncode == 0
            assert up(), "session A stopped the cluster under session B"
            job = b.submit(_script(tmp_path / "ok.sh", "true\n"), cwd=tmp_path, extra_args=("-o", "ok.log"))
            assert b.wait(job, timeout=120) == ("COMPLETED", 0, 0)
        assert not up(), "the last session out left the cluster it had not found running"
    finally:
        if a.poll() is None:
            a.kill()
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)
        shutil.rmtree(private, ignore_errors=True)
