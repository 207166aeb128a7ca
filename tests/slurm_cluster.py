"""Test helper: drive the private one-node Slurm cluster of ``.ci/slurm-cluster``.

Tests that submit job scripts to a real Slurm use :func:`cluster` (typically
through a session-scoped fixture) to bring the cluster up once, then
:meth:`SlurmCluster.submit` and :meth:`SlurmCluster.wait`. The cluster keeps no
accounting database, so job ends are read from ``scontrol show job``, which
remembers finished jobs for ``MinJobAge`` (one hour in the generated
slurm.conf).

Every call to a Slurm command has a timeout: nothing here can hang a test run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import pytest

from conftest import missing_tool, require_root, require_tool

#: The script that starts and stops the cluster.
SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "slurm-cluster"

#: Exit code of ``.ci/slurm-cluster`` when Slurm or munge is missing and
#: cannot be installed (not root, no apt-get, or the install failed).
EXIT_PREREQUISITES = 3

#: Job states after which a job never runs again.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
})

_COMMAND_TIMEOUT = 30  # seconds for any one Slurm client command


class JobResult(NamedTuple):
    """How a job ended: its final ``JobState``, and ``ExitCode=<code>:<signal>``."""

    state: str
    exit_code: int
    signal: int


class SlurmCluster:
    """A running Slurm cluster reached through ``slurm_conf``.

    Parameters
    ----------
    slurm_conf
        Path of the cluster's slurm.conf; exported as ``SLURM_CONF`` to every
        Slurm command and, through sbatch, to the jobs.
    """

    def __init__(self, slurm_conf: str | os.PathLike) -> None:
        self.slurm_conf = Path(slurm_conf)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return this process's environment plus ``SLURM_CONF`` and ``extra``."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.slurm_conf)
        env.update(extra or {})
        return env

    def run(self, *args: str, env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike | None = None,
            timeout: float = _COMMAND_TIMEOUT) -> str:
        """Run a Slurm client command against this cluster and return its stdout.

        Raises
        ------
        RuntimeError
            If the command exits non-zero (the message carries its stderr).
        subprocess.TimeoutExpired
            If it takes longer than ``timeout`` seconds.
        """
        proc = subprocess.run(args, env=self.env(env), cwd=cwd, timeout=timeout,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def submit(self, script_path: str | os.PathLike, *, cwd: str | os.PathLike,
               env: Mapping[str, str] | None = None,
               extra_args: Sequence[str] = ()) -> str:
        """Submit a batch script with ``sbatch --parsable``; return the job ID.

        Parameters
        ----------
        script_path
            The job script.
        cwd
            Working directory of the job (``--chdir``) and of sbatch, so
            relative ``--output`` paths land there.
        env
            Extra environment for sbatch; the job inherits it (sbatch's
            default ``--export=ALL``).
        extra_args
            More sbatch options, e.g. ``("-n", "2", "--time=1")``.
        """
        out = self.run("sbatch", "--parsable", f"--chdir={cwd}", *extra_args,
                       str(script_path), env=env, cwd=cwd)
        return out.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """Return ``scontrol show job -o`` of one job as a dict of its fields."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id))
        # Values never contain spaces except in a few free-text fields we do
        # not use; each token is KEY=VALUE.
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def cancel(self, job_id: str) -> None:
        """Cancel a job (no error if it already ended)."""
        with contextlib.suppress(RuntimeError):
            self.run("scancel", str(job_id))

    def wait(self, job_id: str, timeout: float, poll: float = 0.5) -> JobResult:
        """Poll ``scontrol show job`` until the job reaches a final state.

        Parameters
        ----------
        job_id
            As returned by :meth:`submit`.
        timeout
            Seconds to wait. On expiry the job is cancelled and
            :class:`TimeoutError` raised, with the job's last state and the
            tail of its output file.

        Returns
        -------
        JobResult
            Final state (``COMPLETED``, ``FAILED``, ``CANCELLED``,
            ``TIMEOUT``, ...), exit code and terminating signal.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in FINAL_STATES:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                return JobResult(state, int(code), int(sig or 0))
            time.sleep(poll)
        self.cancel(job_id)
        raise TimeoutError(
            f"Slurm job {job_id} did not end within {timeout:g} s "
            f"(last state {info.get('JobState', 'unknown')}); cancelled it."
            + _output_tail(info.get("StdOut")))


def _output_tail(path: str | None, lines: int = 20) -> str:
    """Return the last lines of a job's output file, for error messages."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as fh:
        tail = "".join(fh.readlines()[-lines:])
    return f"\nLast lines of {path}:\n{tail}" if tail else f"\n{path} is empty."


def _cluster_status() -> bool:
    """Return whether ``.ci/slurm-cluster status`` reports the cluster up."""
    proc = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode == 0


def users_dir() -> Path:
    """The directory of the test sessions using the cluster: one file per session's PID, a
    lock, and the ``started`` marker of a cluster that a test session (not a person) started."""
    return Path(os.environ.get("MPIBURST_SLURM_DIR", "/tmp/mpiburst-slurm") + ".users")


@contextlib.contextmanager
def _users_locked() -> Iterator[Path]:
    """Hold the lock of :func:`users_dir` (sessions join, start, leave and stop the cluster one at a time)."""
    users = users_dir()
    users.mkdir(mode=0o700, exist_ok=True)
    with open(users / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield users
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _other_live_users(users: Path) -> list[int]:
    """Return the PIDs of other live test sessions using the cluster (forgetting dead ones)."""
    from mpiburst.server import pid_alive

    live = []
    for entry in users.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            if pid_alive(int(entry.name)):
                live.append(int(entry.name))
            else:
                entry.unlink(missing_ok=True)
    return live


def require_slurm() -> None:
    """Skip the calling test (CI: fail) unless the test cluster can run: root, slurm-wlm and munge installed."""
    require_root("the test Slurm cluster runs as root (SlurmUser=root)")
    for tool in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged", "mungekey"):
        require_tool(tool)


@contextlib.contextmanager
def cluster(up_timeout: float = 300) -> Iterator[SlurmCluster]:
    """Bring the test cluster up, yield a :class:`SlurmCluster`, then stop it.

    A cluster that was already up before (started by hand or by CI) is left
    running at the end. One started by a test session is stopped with
    ``.ci/slurm-cluster down`` by the last test session that uses it: several
    sessions may share the one cluster of a machine, and none stops it under
    the jobs of another. Use it from a session-scoped fixture so the cluster
    starts once per test session.

    The test is skipped when Slurm cannot be had: not root, or slurm-wlm or
    munge not installed (the tests never install packages; ``.ci/run`` does,
    from ``tests/system-packages.txt``). ``MPIBURST_REQUIRE_TOOLS=1`` (set by
    ``.ci/run``) turns that skip into a failure.

    Parameters
    ----------
    up_timeout
        Seconds allowed for ``up``.
    """
    require_slurm()
    with _users_locked() as users:
        me, started = users / str(os.getpid()), users / "started"
        was_up = _cluster_status()
        proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True,
                              text=True, timeout=up_timeout)
        if proc.returncode == EXIT_PREREQUISITES:
            missing_tool(f"Slurm unavailable: {proc.stderr.strip()}")
        if proc.returncode != 0:
            raise RuntimeError(f".ci/slurm-cluster up failed ({proc.returncode}):\n"
                               f"{proc.stderr}")
        if not was_up:
            started.touch()   # a test session started it: the last one out stops it
        me.touch()
    # stdout is "export SLURM_CONF=<path>".
    conf = proc.stdout.strip().rpartition("SLURM_CONF=")[2]
    try:
        yield SlurmCluster(conf)
    finally:
        with _users_locked():
            me.unlink(missing_ok=True)
            if started.exists() and not _other_live_users(users):
                subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True,
                               timeout=120, check=False)
                started.unlink(missing_ok=True)
