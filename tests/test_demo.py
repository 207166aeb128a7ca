"""The README's first command: ``examples/demo.py`` on real ranks, as a new user reads its output (#11).

Runs the demo small (2 ranks, a few records, one run of each) under the
venv's ``mpiexec`` with the local disk as the BFS, and checks that the output
says which filesystem it wrote to, the application's wait and the time to
durable data beside direct MPI-IO, one sentence on what they mean, and that
both files hold the same bytes. The sentence's wording is checked on chosen
ratios, since a run's own ratios are whatever the machine gives.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, job_env

DEMO = REPO / "examples" / "demo.py"


def _demo_module():
    spec = importlib.util.spec_from_file_location("mpiburst_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # its dataclass looks its module up while it is defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
def test_demo_says_which_bfs_both_times_beside_direct_and_what_they_mean(tmp_path: Path, server_binary: str):
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    assert mpiexec, "the venv has no mpiexec (pip install mpich)"
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", str(DEMO), "--bfs", str(tmp_path),
                           "--bfs-name", "test disk", "--records", "64", "--repeat", "1"],
                          cwd=tmp_path, env=job_env(server_binary), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(rf"^BFS: {re.escape(str(tmp_path))}/mpiburst-demo-\S+ \(\S+: test disk\)$", out, re.M), out
    assert re.search(r"application waits\s+data durable", out), out
    assert re.search(r"^  through mpiburst\s+\d+\.\d\d s\s+\d+\.\d\d s", out, re.M), out
    assert re.search(r"^  direct MPI-IO\s+\d+\.\d\d s\s+\d+\.\d\d s", out, re.M), out
    assert "the case where a burst buffer gains least" in out       # the local disk's sentence
    assert "the BFS files of both hold the same bytes: OK" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []         # it cleans up its BFS directory


def test_the_sentence_matches_the_ratios_it_is_about():
    meaning = _demo_module().meaning
    network = meaning(True, 12.5, 4.4)
    assert "waits 12.5x less" in network and "durable 4.4x sooner" in network    # as printed in the table
    local = meaning(False, 1.01, 0.46)
    assert "waits about as long" in local and "durable 2.2x later" in local      # never "1.0x longer"
    assert "1.0x" not in meaning(False, 0.97, 1.04)
