"""The benchmark keeps working: a tiny ``mpiburst bench`` run on 2 real ranks with a real server.

Checks the shape of what it produces (every pattern, transfer size and method,
positive bandwidths, verified output, a PNG), never the figures themselves:
timings on a shared 2-core machine prove nothing.

Run with ``mpiexec -n 2 python -m mpi4py -m pytest --with-mpi tests/test_bench_mpi.py``.
"""

from __future__ import annotations

import json
import math

import pytest

from mpiburst.bench.report import METHODS
from mpiburst.cli import main

PATTERNS = ["segmented", "strided", "nn"]  # without ckpt: its record differs

# The server is this file's medium, not its subject: its tests run with the first engine only (docs/ci.md).
pytestmark = pytest.mark.workflow
TRANSFERS = [4096, 47008, 65536]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240)
def test_tiny_bench_run_has_every_method_and_pattern(mpi_tmp_path, server_binary, capsys):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out_json = mpi_tmp_path / "bench.json"
    out_png = mpi_tmp_path / "bench.png"
    status = main(["bench", "--pattern", "segmented,strided", "--pattern", "nn", "--transfer", "4k,47008",
                   "--transfer", "64k", "--size", "256k", "--repeat", "2", "--bfs-dir", str(mpi_tmp_path),
                   "--server", server_binary, "--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    comm.Barrier()
    if comm.rank != 0:
        return

    table = capsys.readouterr().out
    assert "abs/ing" in table and "bfs-sh" in table and "targets (local filesystem targets):" in table
    doc = json.loads(out_json.read_text())
    assert doc["params"]["ranks"] == comm.size
    assert doc["params"]["repeat"] == 2
    assert doc["machine"]["cores"] >= 1
    got = {(r["pattern"], r["transfer"]) for r in doc["results"]}
    assert got == {(p, t) for p in PATTERNS for t in TRANSFERS}
    for r in doc["results"]:
        assert r["total_bytes"] == r["bytes_per_rank"] * comm.size > 0
        assert set(r["methods"]) == {key for key, _, _ in METHODS}
        for key, m in r["methods"].items():
            assert m["verified"] is True, (r["pattern"], r["transfer"], key)
            g = m["gbps"]
            assert 0 < g["min"] <= g["median"] <= g["max"] < math.inf, (r["pattern"], r["transfer"], key)
        for name, value in r["ratios"].items():
            assert 0 < value < math.inf, (r["pattern"], r["transfer"], name)
        burst = r["mpiburst"]
        assert burst["flush_writes"]["median"] >= 1
        assert burst["flush_bytes"]["min"] == burst["flush_bytes"]["max"] == r["total_bytes"]
        assert burst["flush_writes"]["min"] <= sum(burst["flush_write_sizes"].values()) <= burst["flush_writes"]["max"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(mpi_tmp_path.glob("mpiburst-bench-*")), "the scratch directory was left behind"


@pytest.mark.timeout(60)
def test_bench_rejects_size_below_transfer(cli):
    result = cli("bench", "--size", "4k", "--transfer", "1m")
    assert result.returncode == 2
    assert "smaller than the largest transfer size" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240)
def test_checkpoint_loop_measures_every_way_and_has_no_target_on_a_local_disk(mpi_tmp_path, server_binary, capsys):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out_json = mpi_tmp_path / "bench.json"
    status = main(["bench", "--pattern", "ckpt", "--transfer", "4k", "--size", "128k", "--steps", "3",
                   "--flush-every", "2", "--work", "0.01", "--repeat", "2", "--bfs-dir", str(mpi_tmp_path),
                   "--server", server_binary, "--json", str(out_json)])
    assert status == 0
    comm.Barrier()
    if comm.rank != 0:
        return

    table = capsys.readouterr().out
    assert "mpiburst/direct" in table and "targets (local filesystem targets):" in table
    doc = json.loads(out_json.read_text())
    assert doc["params"]["steps"] == 3 and doc["params"]["work_iterations"] >= 1
    assert [r["compute"] for r in doc["results"]] == ["numpy", "idle"]     # both kinds of work by default
    for r in doc["results"]:
        assert r["pattern"] == "ckpt" and r["steps"] == 3 and r["flush_every"] == 2
        assert r["total_bytes"] == 3 * 128 * 1024 * comm.size
        assert set(r["methods"]) == {"compute", "mpiio_ckpt", "mpiio_ckpt_1inN", "mpiburst_ckpt", "tier_ingest",
                                     "bfs_write"}
        for key, m in r["methods"].items():
            assert m["verified"] is True, key
            assert 0 < m["seconds"]["min"] <= m["seconds"]["median"] <= m["seconds"]["max"], key
        assert 0 < r["ratios"]["job_time_vs_mpiio"] < math.inf
        assert 0 < r["ratios"]["job_time_vs_mpiio_1inN"] < math.inf
        assert 0 < r["ratios"]["floor_vs_mpiio"] < math.inf and r["ratios"]["own_time_vs_floor"] > 0
    assert len(doc["targets"]) == 2
    assert all(t["met"] is None and "job time / direct MPI-IO" in t["target"] for t in doc["targets"])
    assert not list(mpi_tmp_path.glob("mpiburst-bench-*")), "the scratch directory was left behind"



@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240)
def test_view_pattern_compares_a_vector_view_with_write_at_in_one_run(mpi_tmp_path, server_binary, capsys):
    """--pattern view: both ways verified on the BFS, their ratio printed, a compact index for the view."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out_json = mpi_tmp_path / "bench.json"
    status = main(["bench", "--pattern", "view", "--transfer", "4k,47008", "--size", "1m", "--repeat", "2",
                   "--bfs-dir", str(mpi_tmp_path), "--server", server_binary, "--json", str(out_json)])
    assert status == 0
    comm.Barrier()
    if comm.rank != 0:
        return
    table = capsys.readouterr().out
    assert "view/Write_at" in table and "absorb view" in table
    doc = json.loads(out_json.read_text())
    views = doc["params"]["view"]
    assert [v["transfer"] for v in views] == [4096, 47008]
    for v in views:
        assert v["verified"] == {"write_at": True, "view": True}
        assert all(len(s) == 2 and min(s) > 0 for s in v["seconds"].values())
        assert 0 < v["absorb_ratio"] < math.inf
        records = (1 << 20) // v["transfer"]
        # one strided entry per rank and batch, not one per record (1 MiB per rank fits one batch)
        assert v["entries"]["view"] == comm.size < records
    assert not list(mpi_tmp_path.glob("mpiburst-bench-*")), "the scratch directory was left behind"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240)
def test_files_pattern_measures_every_phase_both_ways(mpi_tmp_path, server_binary, capsys):
    """--pattern files: create, durable, stat, read, remove timed directly and through the tier, bytes verified."""
    from mpi4py import MPI

    from mpiburst.bench.files import PHASES, WAYS

    comm = MPI.COMM_WORLD
    out_json = mpi_tmp_path / "bench.json"
    out_png = mpi_tmp_path / "bench.png"
    status = main(["bench", "--pattern", "files", "--files", "6", "--transfer", "4k,64k", "--repeat", "2",
                   "--bfs-dir", str(mpi_tmp_path), "--server", server_binary, "--json", str(out_json),
                   "--plot", str(out_png)])
    assert status == 0
    comm.Barrier()
    if comm.rank != 0:
        return
    table = capsys.readouterr().out
    assert "create t" in table and "durable t s" in table
    doc = json.loads(out_json.read_text())
    assert doc["params"]["files_per_rank"] == 6
    results = doc["results"]
    assert [(r["pattern"], r["transfer"]) for r in results] == [("files", 4096), ("files", 65536)]
    for r in results:
        assert r["ranks"] == comm.size and r["total_bytes"] == 6 * r["transfer"] * comm.size
        assert set(r["methods"]) == {f"{w}_{p}" for w in WAYS for p in PHASES}
        for key, m in r["methods"].items():
            assert m["verified"] is True, (r["transfer"], key)
            s = m["seconds"]
            assert 0 < s["min"] <= s["median"] <= s["max"] < math.inf, (r["transfer"], key)
        # durable through the tier is the create phase plus the commit
        assert r["methods"]["tier_durable"]["seconds"]["min"] > r["methods"]["tier_create"]["seconds"]["min"]
        # the floor: the tier's create plus the commit's BFS work alone, timed once per repeat
        floor = r["floor"]
        assert 0 < floor["commit_seconds"]["min"] <= floor["commit_seconds"]["max"] < math.inf
        assert floor["durable_seconds"] > r["methods"]["tier_create"]["seconds"]["median"]
        # the create's floor: one plain SET per file into the tier's server, timed once per repeat
        assert 0 < floor["create_seconds"]["min"] <= floor["create_seconds"]["max"] < math.inf
        assert floor["create_time_vs_direct"] > 0
    assert "floor s" in table and "fl/d" in table and "cfl/d" in table
    judged = [t for t in doc["targets"] if "files 64.0 KiB" in t["target"]]
    assert [t["met"] is None for t in judged] == [False, True]   # local disk: create judged, durable not
    assert out_png.stat().st_size > 0
    assert not list(mpi_tmp_path.glob("mpiburst-bench-*")), "the scratch directory was left behind"
