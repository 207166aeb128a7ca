"""The I/O report: counters recorded by mpiburst.File / mpiburst.open and the flush, `mpiburst report`.

A known workload on a real server gives exactly its call counts, sizes and
patterns in ``--json``; the ``--html`` page is opened in a real headless
Chromium, every plot must be in its DOM and the screenshot must not be blank.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from mpi4py import MPI

import mpiburst
from mpiburst import flush, iostats, report, writeback
from mpiburst.server.process import wait_gone
from mpiburst.engine import Engine
from mpiburst.errors import OffsetError
from mpiburst.file import File
from mpiburst.iostats import BINS, Recorder, size_bin
from mpiburst.store import MemoryStore
from mpiburst.tier import Tier
from mpiburst.writeback import TierFile

from conftest import bfs_file, cli_env, require_tool, wait_until

pytestmark = pytest.mark.timeout(180)


def test_size_bins_are_darshans() -> None:
    assert len(BINS) == 10
    edges = {0: 0, 100: 0, 101: 1, 1024: 1, 1025: 2, 10 << 10: 2, (10 << 10) + 1: 3, 100 << 10: 3,
             1 << 20: 4, (1 << 20) + 1: 5, 4 << 20: 5, 10 << 20: 6, 100 << 20: 7, 1 << 30: 8, (1 << 30) + 1: 9}
    assert {n: size_bin(n) for n in edges} == edges


def test_recorder_counts_patterns_and_merges_once() -> None:
    rec = Recorder()
    for off, n in [(0, 10), (10, 10), (50, 10), (0, 4096)]:   # consecutive, consecutive, forward gap, backwards
        rec.writes.add(off, n, 5)
    rec.reads.add(0, 2000, 7)
    store = MemoryStore()
    rec.merge(store, "/bfs/f")
    rec.merge(store, "/bfs/f")                                  # nothing new: no second call adds anything
    (who, counters), = store.stats()[0]["/bfs/f"].items()
    assert who == iostats.process_name()
    assert counters == {"write_calls": 4, "write_bytes": 4126, "write_ns": 20, "write_consecutive": 2,
                        "write_sequential": 1, "write_other": 1, "write_hist_0": 3, "write_hist_2": 1,
                        "read_calls": 1, "read_bytes": 2000, "read_ns": 7, "read_consecutive": 1,
                        "read_sequential": 0, "read_other": 0, "read_hist_2": 1}


def test_write_calls_counted_in_bulk_match_counting_each_call(mem_tier) -> None:
    """A handle's writes, counted in bulk (across the digest boundary too), give the per-call figures."""
    rng = random.Random(18)
    sizes = [0, 1, 100, 101, 1024, 1025, 4096, 10 << 10, (100 << 10) + 1, (1 << 20) + 1, 4 << 20]
    tf = TierFile(mem_tier, bfs_file(mem_tier, "bulk.dat"), 0)
    reference = iostats._Direction()
    end = 0
    for i in range(iostats.DIGEST_CALLS + 900):
        n = sizes[i % 9] if i % 1000 else sizes[9 + i // 1000 % 2]        # a few large ones, one sent directly
        offset = rng.choice([end, end, end + rng.randrange(1, 1 << 16), rng.randrange(0, end + 1)])
        tf.write(offset, memoryview(bytes(n)))
        reference.add(offset, n, 0)
        end = offset + n
    with pytest.raises(OffsetError):
        tf.write(2**63 + 10, memoryview(b"far"))                       # refused: not counted (nor overflowing)
    counted = tf.stats.counters()
    expected = reference.counters("write_")
    assert counted.pop("write_ns") > 0 and expected.pop("write_ns") == 0   # batches sent are timed
    assert counted == expected
    assert expected["write_calls"] == iostats.DIGEST_CALLS + 900 and min(expected["write_consecutive"],
                                                                         expected["write_other"]) > 1000
    tf.close()


@pytest.mark.parametrize("calls", [1, 2, 4, 5, 9])
def test_a_few_write_calls_counted_one_by_one_match_the_bulk_count(calls) -> None:
    """Up to a few calls are counted without numpy (a small file's one write); the figures are the same."""
    rng = random.Random(calls)
    flat = [v for _ in range(calls) for v in (rng.choice([0, 10, 4096, 9000]), rng.choice([1, 100, 4096]))]
    few, reference = iostats._Direction(), iostats._Direction()
    few.end = reference.end = 10
    few.add_calls(flat)
    for offset, size in zip(flat[0::2], flat[1::2]):
        reference.add(offset, size, 0)
    assert few.counters("w_") == reference.counters("w_") and few.end == reference.end


@pytest.mark.parametrize("size", [100, 4096])
def test_the_list_of_write_calls_stays_bounded_and_counts_exactly(mem_tier, size) -> None:
    """Records of one size (counted in bulk by the quicker way) give the per-call figures; the list stays bounded.

    Writes too small to fill batches count the list as it reaches its bound,
    larger ones at each batch sent.
    """
    rng = random.Random(size)
    tf = TierFile(mem_tier, bfs_file(mem_tier, "bounded.dat"), 0)
    bound = writeback._DIGEST_AT + 2 * tf.room // writeback._SMALL_WRITE
    reference = iostats._Direction()
    longest = end = 0
    for _ in range(6 * iostats.DIGEST_CALLS):
        offset = rng.choice([end, end + size, end + size, rng.randrange(0, end + 1)])
        tf.write(offset, memoryview(bytes(size)))
        reference.add(offset, size, 0)
        end = offset + size
        longest = max(longest, len(tf.stats.calls))
    assert 0 < longest <= bound
    counted = tf.stats.counters()
    expected = reference.counters("write_")
    assert counted.pop("write_ns") > 0 and expected.pop("write_ns") == 0
    assert counted == expected
    assert min(expected["write_consecutive"], expected["write_sequential"], expected["write_other"]) > 1000
    tf.close()


def _workload(tier) -> tuple[str, str]:
    """Write a known pattern through both APIs; return the two BFS paths."""
    with mpiburst.open("burst://app/a.dat", "wb", tier=tier) as f:
        for _ in range(100):
            f.write(b"a" * 4096)              # 100 consecutive 4 KiB writes
        f.seek(1 << 20)
        f.write(b"b" * 200)                   # one forward jump, 200 B
    with mpiburst.open("burst://app/a.dat", "rb", tier=tier) as f:
        assert f.readinto(bytearray(1 << 20)) == 1 << 20   # one 1 MiB read (larger than a cache page: direct)
    fh = File.Open(MPI.COMM_SELF, "burst://app/b.dat", MPI.MODE_CREATE | MPI.MODE_RDWR)
    fh.Write_at(2 << 20, b"c" * (2 << 20))    # one 2 MiB write at 2 MiB: a forward gap
    fh.Write_at(0, b"d" * 50)                 # one 50 B write before it
    fh.Close()
    return bfs_file(tier, "app/a.dat"), bfs_file(tier, "app/b.dat")


def test_a_known_workload_gives_exactly_its_numbers(atier, cli, tmp_path) -> None:
    a, b = _workload(atier)
    flushed = flush.sync(a, tier=atier)
    out = tmp_path / "r.json"
    proc = cli("report", "--id", atier.id, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    files = {f["path"]: f for f in report["files"]}
    assert set(files) == {a, b}
    w, r = files[a]["app"]["write"], files[a]["app"]["read"]
    assert (w["calls"], w["bytes"]) == (101, 100 * 4096 + 200)
    assert (w["consecutive"], w["sequential"], w["other"]) == (100, 1, 0)
    assert w["hist"] == [0, 1, 100, 0, 0, 0, 0, 0, 0, 0]
    assert (r["calls"], r["bytes"], r["hist"][4]) == (1, 1 << 20, 1)
    assert w["seconds"] > 0 and r["seconds"] > 0
    assert list(files[a]["processes"]) == [iostats.process_name()]
    bfs = files[a]["bfs"]
    assert bfs["flushes"] == 1 and bfs["writes"] == flushed.writes and bfs["bytes"] == flushed.bytes
    assert bfs["sizes"] == {str(s): c for s, c in flushed.write_sizes.items()}
    assert bfs["align"] == [64 << 10] and sum(bfs["hist"]) == flushed.writes
    assert files[a]["write_call_reduction"] == pytest.approx(101 / flushed.writes)
    wb = files[b]["app"]["write"]
    assert (wb["calls"], wb["bytes"], wb["sequential"], wb["other"]) == (2, (2 << 20) + 50, 1, 1)
    assert wb["hist"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0] and files[b]["bfs"]["flushes"] == 0
    assert report["totals"]["app_write_calls"] == 103
    assert a in proc.stdout and "101 calls" in proc.stdout and "x fewer write calls" in proc.stdout


def test_recording_off_records_nothing(atier, monkeypatch) -> None:
    monkeypatch.setenv("MPIBURST_IOSTATS", "0")
    a, _ = _workload(atier)
    flush.sync(a, tier=atier)
    assert atier.store.stats() == ({}, [])


@pytest.mark.slow
def test_html_report_renders_every_plot_in_chromium(atier, cli, tmp_path) -> None:
    chromium = require_tool("chromium")
    a, _ = _workload(atier)
    flush.sync(a, tier=atier)
    assert wait_until(lambda: len(_events(atier, "fill")) >= 2), "the engine logged no two fill samples"
    page = tmp_path / "r.html"
    proc = cli("report", "--id", atier.id, "--html", str(page), "-q")
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)     # self-contained
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}"]
        dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
        shot = tmp_path / "r.png"
        subprocess.run(base + [f"--screenshot={shot}", "--window-size=1000,1600", page.as_uri()],
                       capture_output=True, timeout=90)
    for plot in ("plot-sizes", "plot-ranks", "plot-flush"):
        svg = re.search(rf'<svg[^>]*id="{plot}".*?</svg>', dom.stdout, re.S)
        assert svg, (plot, dom.stderr[-2000:])
        assert len(re.findall(r'class="bar"', svg.group(0))) >= 1
    for plot in ("plot-bandwidth", "plot-fill"):                         # over time: lines of 2+ points
        svg = re.search(rf'<svg[^>]*id="{plot}".*?</svg>', dom.stdout, re.S)
        assert svg, (plot, dom.stderr[-2000:])
        lines = re.findall(r'<polyline class="line"[^>]*points="([^"]+)"', svg.group(0))
        assert len(lines) == 2 and all(len(pts.split()) >= 2 for pts in lines), (plot, lines)
    _assert_not_blank(shot)


def _assert_not_blank(png) -> None:
    """The screenshot decodes and has many colours (a blank or failed page has one or two)."""
    from PIL import Image

    with Image.open(png) as img:
        img.load()
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20, colours[:5] if colours else None
    blue = sum(c for c, rgb in (colours or []) if rgb == (0x4e, 0x79, 0xa7))
    assert colours is None or blue > 100                                  # the application's bars are drawn


# ----------------------------------------------------------------------------- the engine's samples and events

def _stop_engine(tier) -> None:
    """End the run's engine process (SIGTERM, as stop does), so the test drives an Engine itself."""
    pid = tier.conf.engine_pid
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, None, 30), "the engine did not exit on SIGTERM"


def _events(tier, kind: str) -> list[dict]:
    return [e for e in tier.store.stats()[1] if e["kind"] == kind]


def test_engine_logs_fill_samples_and_its_sync_and_purge_exactly(tmp_path, server_binary) -> None:
    bfs = tmp_path / "bfs"
    bfs.mkdir()
    with Tier.start(id=f"eng{os.getpid()}", dir=str(tmp_path), bfs_root=str(bfs), capacity="48M",
                    server=server_binary, align="64K") as tier:
        _stop_engine(tier)
        with mpiburst.open("burst://big.dat", "wb", tier=tier) as f:
            for _ in range(30):
                f.write(b"x" * (1 << 20))                  # 30 MiB: above the sync threshold (24 MiB), below purge
        path = bfs_file(tier, "big.dat")
        eng = Engine(tier, logging.getLogger("test-engine"), interval=0.05)
        eng.sample(force=True)
        (fill,) = _events(tier, "fill")
        assert (fill["dirty_files"], fill["dirty_bytes"], fill["capacity"]) == (1, 30 << 20, 48 << 20)
        assert fill["used"] >= 30 << 20 and fill["net_in"] >= 30 << 20
        eng.thresholds()                                   # syncs (used >= 0.5 x capacity), frees nothing yet
        (sync,) = _events(tier, "sync")
        assert (sync["trigger"], sync["files"], sync["dirty_files"]) == ("threshold", 1, 1)
        assert _events(tier, "purge") == [] and tier.store.meta(path).dirty is False
        tier.conf.purge_threshold = 0.1                    # now the clean 30 MiB must go
        eng.thresholds()
        (purge,) = _events(tier, "purge")
        assert (purge["trigger"], purge["bytes"]) == ("threshold", 30 << 20)
        eng.sample(force=True)
        fills = _events(tier, "fill")
        assert len(fills) == 2 and fills[-1]["dirty_bytes"] == 0 and fills[-1]["used"] < fill["used"] - (29 << 20)
        data = report.build(tier.store, run=tier.id)
        tl = data["timeline"]
        assert [e["kind"] for e in tl["events"]] == ["sync", "purge"] and len(tl["fill"]) == 2
        flushed = sum(s["bytes_per_second"] * (s["to"] - s["from"]) for s in tl["flush"])
        assert len(tl["absorb"]) == 1 and flushed == pytest.approx(30 << 20, rel=1e-4)   # times: epoch floats
        text = report.summary(data)
        assert "engine: 1 sync(s), 1 purge(s) freeing 30.0 MiB" in text and "tier: peak fill" in text


def test_the_engine_process_samples_the_fill_and_logs_a_requested_sync(atier) -> None:
    with mpiburst.open("burst://eng.dat", "wb", tier=atier) as f:
        f.write(b"e" * (3 << 20))                          # one batch of 3 MiB
    path = bfs_file(atier, "eng.dat")
    assert wait_until(lambda: any(e["dirty_bytes"] == 3 << 20 for e in _events(atier, "fill"))), \
        "no fill sample saw the 3 MiB dirty"
    flush.sync(path, tier=atier, block=False)              # served by the engine
    assert wait_until(lambda: _events(atier, "sync")), "the engine logged no sync"
    (sync,) = _events(atier, "sync")
    assert (sync["trigger"], sync["path"], sync["bytes"]) == ("request", path, 3 << 20)
    assert wait_until(lambda: any(e["t"] > sync["t"] and e["dirty_bytes"] == 0 for e in _events(atier, "fill")))


# ----------------------------------------------------------------------------- reports after the server, and by run

def test_report_reads_a_stopped_run_from_the_statistics_saved_at_stop(atier, cli, tmp_path) -> None:
    a, _ = _workload(atier)
    flushed = flush.sync(a, tier=atier)
    assert wait_until(lambda: _events(atier, "fill")), "the engine logged no sample"   # it is up, its handler set
    stopped = time.time()
    atier.stop()                                           # the engine's last sample, the statistics saved, gone
    saved = tmp_path / f"mpiburst_{atier.id}.stats.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    out = tmp_path / "after.json"
    proc = cli("report", "--id", atier.id, "--dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    files = {f["path"]: f for f in data["files"]}
    w = files[a]["app"]["write"]
    assert (w["calls"], w["bytes"], w["hist"]) == (101, 100 * 4096 + 200, [0, 1, 100, 0, 0, 0, 0, 0, 0, 0])
    assert files[a]["bfs"]["writes"] == flushed.writes and data["run"] == atier.id
    last = data["timeline"]["start"] + data["timeline"]["fill"][-1]["t"]
    assert last >= stopped, "the engine's last sample is not in the saved statistics"
    assert "101 calls" in proc.stdout
    proc = cli("report", "--id", "never-ran", "--dir", str(tmp_path))
    assert proc.returncode != 0 and "not running and left no statistics" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


REPORT_JOB = """\
import sys
import mpiburst
with mpiburst.open("burst://out/r.dat", "wb") as f:
    for _ in range(10):
        f.write(b"r" * 4096)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("status", [0, 3])
def test_run_writes_the_reports_beside_the_run_after_every_job(tmp_path, server_binary, status) -> None:
    (tmp_path / "bfs").mkdir()
    (tmp_path / "job.py").write_text(REPORT_JOB)
    proc = subprocess.run([sys.executable, "-m", "mpiburst", "run", "--id", "rep", "--bfs-root", "bfs",
                           "--capacity", "64M", "--", sys.executable, "job.py", str(status)],
                          cwd=tmp_path, env=cli_env(MPIBURST_SERVER=server_binary), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr
    js, page = tmp_path / "mpiburst_rep.report.json", tmp_path / "mpiburst_rep.report.html"
    assert f"I/O report: {js} and {page}" in proc.stderr
    assert stat.S_IMODE(js.stat().st_mode) == stat.S_IMODE(page.stat().st_mode) == 0o600
    data = json.loads(js.read_text())
    (f,) = data["files"]
    assert f["path"] == os.path.realpath(tmp_path / "bfs" / "out" / "r.dat")
    assert (f["app"]["write"]["calls"], f["app"]["write"]["bytes"], f["app"]["write"]["hist"][2]) == (10, 40960, 10)
    if status == 0:                                        # staged out: one flush of the 40 KiB, its progress shown
        assert (f["bfs"]["flushes"], f["bfs"]["bytes"]) == (1, 40960)
        assert "mpiburst stage-out: 40.0 KiB of 40.0 KiB (100%), " in proc.stderr
    else:                                                  # retained in the saved tier: not flushed
        assert f["bfs"]["flushes"] == 0
    assert data["timeline"]["fill"] and "plot-sizes" in page.read_text()


def test_the_report_says_how_the_nodes_talked():
    plain = report.from_stats(({}, [{"kind": "network", "t": 1.0, "tls": False}]), run="n")
    assert plain["network"] == {"tls": False}
    assert "plaintext TCP, without TLS: the network was declared private to the job" in report.summary(plain)
    assert "mutual TLS" in report.summary(report.from_stats(({}, [{"kind": "network", "t": 1.0, "tls": True}])))
    assert report.from_stats(({}, []))["network"] is None
