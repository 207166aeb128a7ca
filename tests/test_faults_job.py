"""What a job under faults sees: ranks that fail together, one-line errors, true messages (issue #29).

Real parts: a real server (its stalls and deaths are what is tested), real
ranks started by ``mpiexec -n 2 python app.py`` *without* ``-m mpi4py``, as
many applications run (an exception then ends only its own rank, so a rank
left waiting in a collective would hang the job), and ``mpiburst run`` as a
user runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import job_env

from mpiburst.tier import Tier

#: Rank 1 reaches the tier first; rank 0 then stops the server (SIGSTOP) and both open a file: rank 0's
#: connect times out inside File.Open. It prints "rank R raised NAME" or "rank R opened" on stdout.
STALLED_OPEN = textwrap.dedent("""\
    import os, signal, sys, time
    from mpi4py import MPI
    import mpiburst
    from mpiburst.runconf import RunConf
    comm = MPI.COMM_WORLD
    if comm.rank == 1:
        mpiburst.Tier.current()          # connected before the server stalls
    comm.Barrier()
    if comm.rank == 0:
        os.kill(RunConf.load(os.environ["MPIBURST_CONF"]).pid, signal.SIGSTOP)
    try:
        f = mpiburst.File.Open(comm, "burst://a.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    except Exception as exc:
        print(f"rank {comm.rank} raised {type(exc).__name__}", flush=True)
        sys.exit(1)
    print(f"rank {comm.rank} opened", flush=True)
    f.Close()
    """)


def _mpiexec(script: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n 2 python script`` (no ``-m mpi4py``); a hang shows as ``TimeoutExpired``."""
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    return subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


@pytest.mark.slow   # about 8 s: the stalled server's connect takes redis-py's 5 s socket timeout
@pytest.mark.timeout(90)
def test_a_connect_failing_inside_open_fails_every_rank(tier: Tier, tmp_path: Path, server_binary: str) -> None:
    """Promise: a connect failure inside a collective call fails on every rank; none waits.

    Before the fix rank 0's connect timed out and raised before Open's
    collective, and rank 1 waited in it for ever (here: until the timeout).
    """
    script = tmp_path / "app.py"
    script.write_text(STALLED_OPEN)
    env = job_env(server_binary, MPIBURST_CONF=tier.conf.path)
    try:
        done = _mpiexec(script, env, timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank waited in File.Open after the other rank's connect failed")
    finally:
        os.kill(tier.conf.pid, signal.SIGCONT)
    assert done.returncode != 0
    assert "rank 0 raised ServerError" in done.stdout, done.stdout + done.stderr
    assert "rank 1 raised ServerError" in done.stdout, done.stdout + done.stderr
    assert "opened" not in done.stdout


#: Both ranks connect, rank 0 kills the server, both open a file: rank 0's registration meets the dead
#: server (its TierConnectionError has the redis-py error as its cause), rank 1 gets rank 0's error.
DEAD_OPEN = textwrap.dedent("""\
    import os, signal
    from mpi4py import MPI
    import mpiburst
    from mpiburst.runconf import RunConf
    comm = MPI.COMM_WORLD
    mpiburst.Tier.current()
    comm.Barrier()
    if comm.rank == 0:
        os.kill(RunConf.load(os.environ["MPIBURST_CONF"]).pid, signal.SIGKILL)
    comm.Barrier()
    try:
        mpiburst.File.Open(comm, "burst://a.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    except mpiburst.MpiburstError as exc:
        print(f"rank {comm.rank} cause {type(exc.__cause__).__module__}.{type(exc.__cause__).__name__}", flush=True)
        raise
    """)


#: An mpiburst error with a redis-py cause, uncaught (what a rank's lost connection raises).
CHAINED = textwrap.dedent("""\
    import redis
    from mpiburst.errors import TierConnectionError
    try:
        raise redis.ConnectionError("Connection refused")
    except redis.ConnectionError as exc:
        raise TierConnectionError("lost the connection to the tier's server") from exc
    """)


@pytest.mark.timeout(90)
def test_a_ranks_uncaught_error_is_one_line_with_its_cause_kept(tier: Tier, tmp_path: Path,
                                                                 server_binary: str) -> None:
    """Promise: a rank's uncaught mpiburst error prints one line, its cause kept; MPIBURST_DEBUG=1 prints all.

    Before the fix each rank printed the traceback of the redis-py
    ConnectionError, then "The above exception was the direct cause...",
    then its own.
    """
    script = tmp_path / "app.py"
    script.write_text(DEAD_OPEN)
    done = _mpiexec(script, job_env(server_binary, MPIBURST_CONF=tier.conf.path), timeout=45)
    assert done.returncode != 0
    assert "rank 0 cause redis.exceptions.ConnectionError" in done.stdout, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert len(errors) == 2, done.stderr      # one line per rank, nothing else naming an error
    assert all(line.startswith("TierConnectionError: lost the connection to the tier's server") for line in errors)
    assert all(line.endswith("[MPIBURST_DEBUG=1 shows the traceback]") for line in errors)
    assert "Traceback" not in done.stderr
    loud = subprocess.run([sys.executable, "-c", "import mpiburst\n" + CHAINED], capture_output=True, text=True,
                          env=job_env(server_binary, MPIBURST_DEBUG="1"), timeout=60)
    assert "Traceback (most recent call last)" in loud.stderr
    assert "redis.exceptions.ConnectionError: Connection refused" in loud.stderr
    assert "The above exception was the direct cause" in loud.stderr
