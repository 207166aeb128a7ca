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
import time
from pathlib import Path

import pytest
from conftest import job_env, processes_gone

from mpiburst.runconf import RunConf
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
        if sys.argv[1] == "open":
            mpiburst.File.Open(comm, "burst://a.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE).Close()
        else:
            mpiburst.Checkpoints(comm, "sim")
    except Exception as exc:
        print(f"rank {comm.rank} raised {type(exc).__name__}", flush=True)
        sys.exit(1)
    print(f"rank {comm.rank} opened", flush=True)
    """)


def _mpiexec(script: Path, env: dict, timeout: float, *args: str) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n 2 python script ARGS`` (no ``-m mpi4py``); a hang shows as ``TimeoutExpired``."""
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    return subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


@pytest.mark.slow   # about 8 s: the stalled server's connect takes redis-py's 5 s socket timeout
@pytest.mark.timeout(90)
@pytest.mark.parametrize("first", ["open", "checkpoints"])
def test_a_connect_failing_inside_open_fails_every_rank(tier: Tier, tmp_path: Path, server_binary: str,
                                                        first: str) -> None:
    """Promise: a connect failure inside a collective call fails on every rank; none waits.

    Before the fix rank 0's connect timed out and raised before Open's
    collective, and rank 1 waited in it for ever (here: until the timeout);
    with ``mpiburst.Checkpoints`` rank 1 went on alone.
    """
    script = tmp_path / "app.py"
    script.write_text(STALLED_OPEN)
    env = job_env(server_binary, MPIBURST_CONF=tier.conf.path)
    try:
        done = _mpiexec(script, env, 45, first)
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


# ----------------------------------------------------------------------------- mpiburst run: what it says and saves

#: A job through mpiburst.open: closes 'done.dat'; rewrites half of 'again.dat' (closed once as v1) and
#: writes half of 'half.dat', both still open and pushed to the tier; then syncs 'synced.dat' if asked,
#: touches 'ready', waits for 'go' if asked, and dies like a killed rank (os._exit: nothing closed).
OPEN_AT_FAILURE = textwrap.dedent("""\
    import os, time
    import mpiburst
    def write(name, data, mode="wb"):
        f = mpiburst.open("burst://" + name, mode)
        f.write(data)
        return f
    write("done.dat", b"D" * 100_000).close()
    write("again.dat", b"1" * 100_000).close()
    if os.environ.get("JOB_SYNC"):
        write("synced.dat", b"S" * 100_000).close()
        mpiburst.sync("burst://synced.dat")
    again = write("again.dat", b"2" * 50_000, "r+b")
    again.flush()
    half = write("half.dat", b"H" * 50_000)
    half.flush()
    open("ready", "w").close()
    deadline = time.monotonic() + 60
    while os.environ.get("JOB_WAIT") and not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.02)
    os._exit(1)
    """)


def _run(workdir: Path, server_binary: str, *args: str, wait: bool = True, **env: str):
    """Run (``wait``) or start ``python -m mpiburst ARGS`` in ``workdir``."""
    cmd = [sys.executable, "-m", "mpiburst", *args]
    environ = job_env(server_binary, **env)
    if not wait:
        return subprocess.Popen(cmd, cwd=workdir, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=workdir, env=environ, capture_output=True, text=True, timeout=90)


def _no_traceback(done) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr + done.stdout


@pytest.mark.timeout(60)
def test_run_advises_a_stage_out_only_when_it_saved_something(tmp_path: Path, server_binary: str) -> None:
    """Promise: the advice to run stage-out comes only with a snapshot to stage out (#29 item 4).

    Before the fix ``mpiburst run --id e -- false`` advised ``mpiburst
    stage-out --id e``, which then failed: "run e is neither running nor saved".
    """
    done = _run(tmp_path, server_binary, "run", "--id", "e", "--capacity", "16M", "--", "false")
    _no_traceback(done)
    assert done.returncode == 1
    assert "stage-out" not in done.stderr, done.stderr
    assert not list(tmp_path.glob("redis_e*.rdb"))
    assert _run(tmp_path, server_binary, "stage-out", "--id", "e").returncode != 0   # indeed nothing to do


@pytest.mark.slow   # three stage-outs, each reloading the snapshot: about 6 s
@pytest.mark.timeout(120)
def test_stage_out_after_a_failure_publishes_closed_states_only(tmp_path: Path, server_binary: str) -> None:
    """Promise: after a failed job, no file still open for writing is published under its final name.

    'again.dat' was closed as v1, then half rewritten; 'half.dat' never
    closed. Stage-out publishes 'done.dat' and v1 of 'again.dat', lists both
    open files as incomplete and keeps them in the snapshot; ``--incomplete``
    writes them beside as NAME.incomplete; a PARTIAL policy line publishes
    one under its name. Before the fix stage-out published both half-written
    files under their final names.
    """
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    (tmp_path / "job.py").write_text(OPEN_AT_FAILURE)
    done = _run(tmp_path, server_binary, "run", "--id", "f", "--bfs-root", "bfs", "--capacity", "32M", "--",
                sys.executable, "job.py")
    _no_traceback(done)
    assert done.returncode == 1
    assert f"still open for writing when the command failed, so incomplete: {bfs / 'again.dat'}, " \
           f"{bfs / 'half.dat'}" in done.stderr, done.stderr
    assert "mpiburst stage-out --id f" in done.stderr

    out = _run(tmp_path, server_binary, "stage-out", "--id", "f")
    _no_traceback(out)
    assert out.returncode == 0, out.stderr
    assert (bfs / "done.dat").read_bytes() == b"D" * 100_000
    assert (bfs / "again.dat").read_bytes() == b"1" * 100_000          # its last closed state, not the half
    assert not (bfs / "half.dat").exists()
    assert f"incomplete {bfs / 'half.dat'}  (still open for writing: nothing of it is on the BFS" in out.stdout
    assert f"incomplete {bfs / 'again.dat'}  (still open for writing: its last closed or synced state was " \
           f"published" in out.stdout, out.stdout
    assert (tmp_path / "redis_f.rdb").exists()                        # the incomplete data stays saved

    beside = _run(tmp_path, server_binary, "stage-out", "--id", "f", "--incomplete")
    assert beside.returncode == 0, beside.stderr
    assert (bfs / "half.dat.incomplete").read_bytes() == b"H" * 50_000
    assert (bfs / "again.dat.incomplete").read_bytes() == b"2" * 50_000 + b"1" * 50_000
    assert not (bfs / "half.dat").exists() and (bfs / "again.dat").read_bytes() == b"1" * 100_000
    assert not list(bfs.glob(".*"))                                    # no hidden file left behind

    (tmp_path / "policy").write_text("PARTIAL half.dat\n")
    partial = _run(tmp_path, server_binary, "stage-out", "--id", "f", "-f", "policy")
    assert partial.returncode == 0, partial.stderr
    assert f"partial  {bfs / 'half.dat'}" in partial.stdout, partial.stdout
    assert (bfs / "half.dat").read_bytes() == b"H" * 50_000
    assert (bfs / "again.dat").read_bytes() == b"1" * 100_000         # no PARTIAL rule: still its closed state
    _run(tmp_path, server_binary, "stage-out", "--id", "f", "-d", "again.dat")   # drops the snapshot's last file


@pytest.mark.timeout(90)
def test_a_dead_servers_message_lists_the_files_the_bfs_lacks(tmp_path: Path, server_binary: str) -> None:
    """Promise: after a server death, ``mpiburst run`` names the closed files whose BFS version is older.

    Before the fix it said "files synced earlier are complete on the BFS" and
    named nothing, although 'done.dat' and 'again.dat' had been closed and
    never synced.
    """
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    (tmp_path / "job.py").write_text(OPEN_AT_FAILURE)
    proc = _run(tmp_path, server_binary, "run", "--id", "d", "--bfs-root", "bfs", "--capacity", "32M", "--",
                sys.executable, "job.py", wait=False, JOB_WAIT="1", JOB_SYNC="1")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the job never got ready"
            time.sleep(0.02)
        time.sleep(4 * 0.5)     # mpiburst run looks at the files every 0.5 s
        os.kill(RunConf.load(str(tmp_path / "mpiburst_d.conf")).pid, signal.SIGKILL)
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in err and proc.returncode != 0, err
    said = err[err.index("the server of run d"):]
    assert f"the BFS lacked the last closed or synced state of {bfs / 'again.dat'}, {bfs / 'done.dat'};" in said, err
    assert f"being written then (never published half-written): {bfs / 'again.dat'}, {bfs / 'half.dat'};" in said
    assert "synced.dat" not in said
    assert (bfs / "synced.dat").read_bytes() == b"S" * 100_000


@pytest.mark.timeout(90)
def test_a_signal_while_the_run_starts_its_server_is_kept_not_fatal(tmp_path: Path, server_binary: str) -> None:
    """Promise: SIGUSR1 as soon as the run's server is up commits later; it never kills ``mpiburst run``.

    Found by the fault loop: the handlers were installed only after the
    server had started, so a SIGUSR1 in between killed the wrapper (exit
    -10) and left the server running.
    """
    (tmp_path / "job.py").write_text(OPEN_AT_FAILURE.replace("os._exit(1)", "half.close(); again.close()"))
    (tmp_path / "bfs").mkdir()
    proc = _run(tmp_path, server_binary, "run", "--id", "u", "--bfs-root", "bfs", "--capacity", "32M", "--",
                sys.executable, "job.py", wait=False)
    try:
        conf = tmp_path / "mpiburst_u.conf"
        deadline = time.monotonic() + 30
        while not conf.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the run never wrote its conf"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "SIGUSR1: committing" in err
    assert (tmp_path / "bfs" / "half.dat").read_bytes() == b"H" * 50_000
    assert processes_gone(tmp_path)
