"""examples/heat_ckpt.py killed and restarted through ``mpiburst run`` (real server, real ranks, real SIGTERM).

A serial test: it starts its own ``mpiexec -n 2`` and ``-n 3`` jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, cli_env, heat_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

POINTS, STEPS, EVERY = 4000, 40, 2


def run_heat(tmp: Path, server_binary: str, ranks: int) -> subprocess.Popen:
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    cmd = [sys.executable, "-m", "mpiburst", "run", "--id", "heat", "--bfs-root", "bfs", "--capacity", "128M",
           "--", mpiexec, "-n", str(ranks), sys.executable, str(EXAMPLES / "heat_ckpt.py"),
           "--points", str(POINTS), "--steps", str(STEPS), "--every", str(EVERY), "--flush-every", "2",
           "--step-time", "0.1"]
    return subprocess.Popen(cmd, cwd=tmp, env=cli_env(MPIBURST_SERVER=server_binary), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_heat_killed_and_restarted_ends_as_if_never_killed(tmp_path, server_binary):
    """Promise: a job killed mid-run restarts from its newest checkpoint and ends with the uninterrupted result."""
    (tmp_path / "bfs").mkdir()
    first = run_heat(tmp_path, server_binary, 2)
    try:
        flushed = tmp_path / "bfs/heat/ckpt.8/.mpiburst-checkpoint.json"   # 4th save: flushed (flush_every=2)
        deadline = time.monotonic() + 120
        while not flushed.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)     # as scancel does: 'mpiburst run' forwards it and keeps the tier
        out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode != 0 and (tmp_path / "redis_heat.rdb").exists(), out   # mpiexec's status; tier kept
    assert f"checkpoint {STEPS} saved" not in out
    assert not (tmp_path / f"bfs/heat/ckpt.{STEPS}").exists()

    again = run_heat(tmp_path, server_binary, 3)       # another number of ranks, the retained tier reloaded
    out2, _ = again.communicate(timeout=180)
    assert again.returncode == 0, out2
    resumed = [int(line.split()[-1]) for line in out2.splitlines() if line.startswith("restarted from checkpoint")]
    assert resumed and resumed[0] >= 8, out2
    result = np.fromfile(tmp_path / f"bfs/heat/ckpt.{STEPS}/u.dat")
    assert np.array_equal(result, heat_state(POINTS, STEPS))
