"""The benchmark on a network filesystem: a short ``mpiburst bench`` run with a GlusterFS volume as the BFS.

The volume is the one ``scripts/dfs.sh up`` brings up (.ci/run does it and
exports its mount point as ``$MPIBURST_DFS``). Without one the test is
skipped; ``MPIBURST_REQUIRE_TOOLS=1`` (set by .ci/run) turns that skip into a
failure. Checks the shape of what the run produces on that filesystem (the
filesystem recorded, the network targets judged, the checkpoint loop and the
shared-file limit measured, every output verified), never the figures.

Run with ``MPIBURST_DFS=$(scripts/dfs.sh up) mpiexec -n 2 python -m mpi4py -m pytest --with-mpi
tests/test_bench_dfs_mpi.py``.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import missing_tool

from mpiburst.bench.main import filesystem
from mpiburst.cli import main

# The server is this file's medium, not its subject: its tests run with the first engine only (docs/ci.md).
pytestmark = pytest.mark.workflow


def _volume() -> str:
    """Return the GlusterFS mount point from ``$MPIBURST_DFS``, or skip (fail under MPIBURST_REQUIRE_TOOLS=1)."""
    path = os.environ.get("MPIBURST_DFS", "")
    if not path:
        reason = ("needs a GlusterFS volume: as root, with the Debian packages glusterfs-server and glusterfs-client, "
                  "set MPIBURST_DFS to the mount point 'scripts/dfs.sh up' prints")
    elif filesystem(path)["type"] != "fuse.glusterfs":
        reason = f"MPIBURST_DFS={path} is not a mounted GlusterFS volume (run 'scripts/dfs.sh up' as root)"
    else:
        return path
    missing_tool(reason)
    raise AssertionError("not reached: missing_tool skips or fails")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240)
def test_short_bench_on_glusterfs_judges_network_targets(mpi_tmp_path, server_binary, capsys):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    volume = _volume()
    out_json = mpi_tmp_path / "bench.json"
    status = main(["bench", "--pattern", "strided,ckpt", "--transfer", "4k,64k", "--size", "512k", "--repeat", "1",
                   "--steps", "2", "--work", "0.01", "--bfs-dir", volume, "--server", server_binary,
                   "--json", str(out_json)])
    assert status == 0
    comm.Barrier()
    if comm.rank != 0:
        return

    table = capsys.readouterr().out
    assert "targets (network filesystem targets):" in table
    doc = json.loads(out_json.read_text())
    for fs in (doc["params"]["bfs"], doc["machine"]["bfs"]):
        assert fs["type"] == "fuse.glusterfs" and fs["mount"] == os.path.realpath(volume) and fs["options"]
    assert doc["machine"]["cores"] >= doc["machine"]["cpus_usable"] >= 1
    got = {(r["pattern"], r["transfer"]) for r in doc["results"]}
    assert got == {(p, t) for p in ("strided", "ckpt") for t in (4096, 65536)}
    for r in doc["results"]:
        for key, m in r["methods"].items():
            assert m["verified"] is True, (r["pattern"], r["transfer"], key)
            assert m["seconds"]["min"] > 0, (r["pattern"], r["transfer"], key)
    strided = [r for r in doc["results"] if r["pattern"] == "strided"]
    assert all(r["methods"]["bfs_shared_write"]["gbps"]["median"] > 0 for r in strided)
    texts = [t["target"] for t in doc["targets"]]
    assert any("strided 4k: write time / direct MPI-IO" in t and "(<= 0.10)" in t for t in texts)
    assert any("strided 4k: time to durable / direct MPI-IO" in t and "(<= 0.50)" in t for t in texts)
    assert any("strided 4k: flush / BFS raw shared write" in t for t in texts)
    ckpt = [t for t in doc["targets"] if t["target"].startswith("ckpt ")]
    assert len(ckpt) == 4 and all(t["met"] in (True, False) for t in ckpt)    # 2 sizes x numpy and idle work
