"""The benchmark's figures from raw timings: which limit a flush is held to, which targets a filesystem gets."""

from __future__ import annotations

import math

import pytest

from conftest import cli_env
from mpiburst.bench import report
from mpiburst.bench.main import filesystem


def _raw(pattern: str, transfer: int, **seconds: float) -> dict:
    """Return a raw configuration dict with every method at 1 s unless given."""
    times = {key: [seconds.get(key, 1.0)] for key, _, _ in report.METHODS}
    return {
        "pattern": pattern, "transfer": transfer, "ranks": 2, "bytes_per_rank": 1 << 20, "total_bytes": 2 << 20,
        "seconds": times, "verified": {},
        "mpiburst": {"flush_bytes": [2 << 20], "flush_writes": [1], "write_sizes": {2 << 20: 1},
                     "client_peak": [0], "server_bytes": [2 << 20]},
    }


def _ckpt(compute: float, direct: float, burst: float, direct_1in4: float = 2.0, mode: str = "numpy",
          ingest: float = 0.2, bfs: float = 0.2) -> dict:
    return {"pattern": "ckpt", "compute": mode, "flush_every": 4, "transfer": 4096, "ranks": 2, "steps": 4,
            "work_iterations": 10, "work_seconds": 0.25, "bytes_per_rank": 1 << 20, "total_bytes": 2 << 20,
            "seconds": {"compute": [compute], "mpiio_ckpt": [direct], "mpiio_ckpt_1inN": [direct_1in4],
                        "mpiburst_ckpt": [burst], "tier_ingest": [ingest], "bfs_write": [bfs]},
            "verified": {"compute": True, "mpiio_ckpt": True, "mpiio_ckpt_1inN": True, "mpiburst_ckpt": True,
                         "tier_ingest": True, "bfs_write": True}}


PARAMS = {"write_buffer": 4 << 20, "size": "1.0 MiB"}
GLUSTER = PARAMS | {"bfs": {"type": "fuse.glusterfs", "device": "127.0.0.2:/dfsvol", "mount": "/m", "options": "rw"}}
EXT4 = PARAMS | {"bfs": {"type": "ext4", "device": "/dev/vda", "mount": "/", "options": "rw"}}


def test_flush_of_a_shared_file_is_held_to_the_shared_write_and_nn_to_file_per_rank():
    strided = report.summarize(_raw("strided", 4096, bfs_write=1.0, bfs_shared_write=2.0, mpiburst_flush=4.0))
    nn = report.summarize(_raw("nn", 4096, bfs_write=1.0, bfs_shared_write=2.0, mpiburst_flush=4.0))
    assert strided["ratios"]["flush_vs_bfs_write"] == 0.5
    assert nn["ratios"]["flush_vs_bfs_write"] == 0.25


def test_recording_cost_is_the_median_of_the_repeats_pairs():
    raw = _raw("strided", 4096)
    raw["seconds"]["mpiburst_write"] = [1.0, 2.0, 1.0]               # recorded absorb
    raw["seconds"]["mpiburst_write_unrecorded"] = [0.99, 1.0, 1.0]   # its pair, recording off: 0.99, 0.5, 1.0
    r = report.summarize(raw)
    assert r["ratios"]["absorb_recorded_vs_unrecorded"] == 0.99     # the drifted pair (0.5) does not count
    assert r["mpiburst"]["recorded_vs_unrecorded_pairs"] == [0.99, 0.5, 1.0]   # every pair in the JSON
    verdict = _verdicts([r], EXT4)["strided 4k: absorb with I/O recording / without"]
    assert verdict == ("strided 4k: absorb with I/O recording / without = 0.990 (>= 0.98)", True)
    row = report.table([r], EXT4 | {"repeat": 3, "ranks": 2, "server": "redis"}).splitlines()
    assert "abs-norec" in row[0] and "rec/norec" in row[0] and "0.990" in row[2]


def _verdicts(results, params):
    return {text.split(" = ")[0]: (text, met) for text, met in report.targets(results, params)}


def test_network_filesystem_gets_the_strict_write_and_durable_targets():
    # write 0.2 s and write + flush 0.4 s against 1 s of direct MPI-IO: 0.20 and 0.40
    raw = [_raw("strided", 4096, mpiburst_write=0.2, mpiburst_flush=0.2, mpiburst_end_to_end=0.4),
           _raw("strided", 1 << 20, mpiburst_write=0.2, mpiburst_flush=1.0, mpiburst_end_to_end=1.2)]
    results = [report.summarize(r) for r in raw]
    net = _verdicts(results, GLUSTER)
    assert net["strided 4k: write time / direct MPI-IO"] == (
        "strided 4k: write time / direct MPI-IO = 0.20 (<= 0.10)", False)
    assert net["strided 4k: time to durable / direct MPI-IO"][1] is True      # 0.40 <= 0.50
    assert net["strided 1m: time to durable / direct MPI-IO"][1] is False     # 1.20 > 1.10
    local = _verdicts(results, EXT4)
    assert local["strided 4k: write time / direct MPI-IO"][1] is True         # 0.20 <= 0.50
    assert not any("time to durable" in key for key in local)


def test_checkpoint_loop_is_judged_on_a_network_filesystem_only_against_its_work_s_target():
    results = [report.summarize(_ckpt(compute=1.0, direct=4.0, burst=2.0)),
               report.summarize(_ckpt(compute=1.0, direct=4.0, burst=1.6, direct_1in4=3.2, mode="idle"))]
    assert results[0]["ratios"]["job_time_vs_mpiio"] == 0.5
    assert results[0]["ratios"]["job_time_vs_mpiio_1inN"] == 1.0
    assert results[0]["ratios"]["io_share_of_direct_job"] == 0.75
    assert results[0]["ratios"]["floor_vs_mpiio"] == 0.35                  # (1.0 + 0.2 + 0.2) / 4.0
    assert math.isclose(results[0]["ratios"]["own_time_vs_floor"], 2.5)    # (2.0 - 1.0) / (0.2 + 0.2)
    (numpy, met), (idle, idle_met) = report.targets(results, GLUSTER)
    assert met is True and "(numpy work): job time / direct MPI-IO every checkpoint = 0.50 (<= 0.50" in numpy
    assert "75%" in numpy and "against direct one in 4: 1.00" in numpy and "one raw BFS write: 0.35" in numpy
    assert idle_met is False and "(idle work)" in idle and "= 0.40 (<= 0.30" in idle and "one in 4: 0.50" in idle
    assert [met for _, met in report.targets(results, EXT4)] == [None, None]
    table = report.table(results, GLUSTER | {"repeat": 1, "ranks": 2, "server": "redis", "steps": 4,
                                             "work_seconds": 0.25, "work_iterations": 10, "ckpt_size": "256 KiB",
                                             "flush_every": 4})
    assert "mpiburst/direct 1/N" in table and "fuse.glusterfs on 127.0.0.2:/dfsvol" in table
    assert "floor/direct" in table and "every checkpoint's records SET into the tier by plain redis-py" in table
    assert "idle = every rank waits on a timer" in table


def _files(size: int, direct: float, create: float, commit: float) -> dict:
    """A files measurement's raw figures: every phase takes ``direct`` seconds directly; the tier as given."""
    from mpiburst.bench.files import PHASES

    seconds = {f"direct_{p}": [direct] for p in PHASES}
    seconds |= {f"tier_{p}": [direct] for p in PHASES} | {"tier_create": [create], "tier_durable": [create + commit]}
    return {"pattern": "files", "transfer": size, "ranks": 2, "files_per_rank": 100, "bytes_per_rank": 100 * size,
            "total_bytes": 200 * size, "seconds": seconds, "verified": {"direct": True, "tier": False}}


def test_files_targets_judge_64k_files_strictly_on_a_network_filesystem():
    results = [report.summarize(_files(64 << 10, direct=1.0, create=0.5, commit=0.4)),
               report.summarize(_files(4 << 10, direct=1.0, create=0.05, commit=0.1))]
    m = results[0]["methods"]
    assert m["tier_create"]["files_per_second"] == 400 and m["tier_durable"]["seconds"]["median"] == 0.9
    assert m["tier_stat"]["verified"] is False and m["direct_stat"]["verified"] is True
    net = _verdicts(results, GLUSTER)
    assert net["files 64.0 KiB x 100/rank: create+write+close / direct"] == (
        "files 64.0 KiB x 100/rank: create+write+close / direct = 0.50 (<= 0.10)", False)
    assert net["files 64.0 KiB x 100/rank: time until all durable / direct"][1] is True    # 0.90 <= 1.00
    assert net["files 4.0 KiB x 100/rank: create+write+close / direct"][1] is None        # judged at 64 KiB only
    local = _verdicts(results, EXT4)
    assert local["files 64.0 KiB x 100/rank: create+write+close / direct"][1] is True      # 0.50 <= 1.00
    assert local["files 64.0 KiB x 100/rank: time until all durable / direct"][1] is None
    table = report.table(results, EXT4 | {"repeat": 1, "ranks": 2, "server": "redis"})
    assert "create t" in table and "400!" in table   # the tier's wrong bytes are marked


def test_filesystem_names_the_innermost_mount(tmp_path):
    fs = filesystem(str(tmp_path))
    assert fs["type"] != "unknown" and fs["options"]
    assert str(tmp_path.resolve()).startswith(fs["mount"])
    assert filesystem("/proc/self")["type"] == "proc"


@pytest.mark.timeout(60)
def test_bench_rejects_checkpoints_the_tier_cannot_hold(cli):
    # a singleton MPI process: run from this serial file, never under mpiexec (the child would inherit its PMI)
    result = cli("bench", "--pattern", "ckpt", "--size", "64m", "--steps", "40", "--capacity", "1G")
    assert result.returncode == 2
    assert "cannot hold 40 checkpoints of 1 ranks x 64.0 MiB" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_bench_on_the_device_without_one_says_so_in_one_sentence(cli):
    """``--device cuda`` where no CUDA device is visible (CUDA_VISIBLE_DEVICES hides a GPU the machine may have)."""
    result = cli("bench", "--device", "cuda", env=cli_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "mpiburst bench: --device cuda: no CUDA device is visible to this process (no CUDA runtime among cupy, "
        "cuda-python and libcudart sees one); run it on a GPU node, or leave out --device.")
    assert result.stdout == ""
