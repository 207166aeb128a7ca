"""Live progress: the meter's lines, and ``sync -V``, ``prestage -V``, ``stage-out``, ``status --watch`` on a real server.

Each command's final progress line gives the exact bytes of a known workload;
``status --watch`` shows the exact dirty bytes and ends cleanly on ``--count``
and on Ctrl-C.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

import mpiburst
from mpiburst import progress

from conftest import bfs_file, cli_env

pytestmark = pytest.mark.timeout(120)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_prints_plain_lines_with_rate_and_time_left(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    meter = progress.Meter("sync /x", total=4 << 20, stream=out, every=5.0)
    clock.now += 1
    meter.update(1 << 20)                      # before the first line is due: nothing
    clock.now += 4
    meter.update(2 << 20)                      # 2 MiB in 5 s, 2 MiB left: 5 s
    clock.now += 5
    meter.update(4 << 20)
    meter.finish()
    assert out.getvalue().splitlines() == [
        "sync /x: 2.0 MiB of 4.0 MiB (50%), 409.6 KiB/s, 5 s left",
        "sync /x: 4.0 MiB of 4.0 MiB (99%), 409.6 KiB/s, 0 s left",
        "sync /x: 4.0 MiB of 4.0 MiB (100%), 409.6 KiB/s, 10 s done"]


def test_meter_draws_a_bar_in_place_on_a_terminal(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    meter = progress.Meter("commit", total=100, stream=out, tty=True)
    clock.now += 1
    meter.add(50)
    meter.finish()
    first, last = out.getvalue().split("\r")[1:]
    assert first == f"commit [{'#' * 12}{'.' * 12}] 50 B of 100 B (50%), 50 B/s, 1 s left\x1b[K"
    assert last == f"commit [{'#' * 24}] 50 B of 50 B (100%), 50 B/s, 1 s\x1b[K\n"   # the estimate was 100 B


def test_meter_totals_add_up_when_the_estimate_was_low() -> None:
    """Promise: a progress line never shows more done than its total (#29: "16.0 MiB of 12.0 MiB (100%)")."""
    out = io.StringIO()
    meter = progress.Meter("mpiburst stage-out", total=12 << 20, stream=out, every=0.0)
    meter.update(16 << 20)                     # whole stripes written: more than the dirty bytes estimated
    meter.finish()
    shown = out.getvalue().splitlines()
    assert shown[0].startswith("mpiburst stage-out: 16.0 MiB of 16.0 MiB (99%), "), shown
    assert shown[-1].startswith("mpiburst stage-out: 16.0 MiB of 16.0 MiB (100%), "), shown


def _write(tier, name: str, size: int) -> str:
    with mpiburst.open(f"burst://{name}", "wb", tier=tier) as f:
        f.write(os.urandom(size))
    return bfs_file(tier, name)


def _last(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sync_prestage_and_stage_out_show_their_bytes(atier, cli) -> None:
    path = _write(atier, "p/sync.dat", 3 << 20)
    done = cli("sync", "--id", atier.id, "-b", "-V", path)
    assert done.returncode == 0, done.stderr
    assert any(line.startswith(f"sync {path}: 3.0 MiB of 3.0 MiB (100%), ") and line.endswith(" done")
               for line in done.stderr.splitlines()), done.stderr
    bfs_only = bfs_file(atier, "p/in.dat")
    with open(bfs_only, "wb") as f:
        f.write(os.urandom((2 << 20) + 5))
    done = cli("prestage", "--id", atier.id, "-b", "-V", bfs_only)
    assert done.returncode == 0, done.stderr
    assert _last(done.stderr).startswith(f"prestage {bfs_only}: 2.0 MiB of 2.0 MiB (100%), "), done.stderr
    _write(atier, "p/out.dat", 1 << 20)
    done = cli("stage-out", "--id", atier.id)
    assert done.returncode == 0, done.stderr
    assert _last(done.stderr).startswith("mpiburst stage-out: 1.0 MiB of 1.0 MiB (100%), "), done.stderr


def test_status_watch_shows_fill_dirty_and_rates_and_stops(atier, cli) -> None:
    _write(atier, "w.dat", 3 << 20)
    done = cli("status", "--id", atier.id, "--watch", "--count", "2", "--interval", "0.2")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    first, second = done.stdout.splitlines()
    assert "dirty 3.0 MiB in 1 file(s)" in first and first.endswith("in -  out -")
    assert f"of {256 << 20 >> 20}.0 MiB" in first and " in " in second and "/s  out " in second
    proc = subprocess.Popen([sys.executable, "-m", "mpiburst", "status", "--id", atier.id, "--watch",
                             "--interval", "0.2"], cwd=atier.conf.dir, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "dirty 3.0 MiB" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and err == "", err
    bad = cli("status", "--id", atier.id, "--watch", "--count", "0")
    assert bad.returncode == 2 and "--count at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_job_bytes_shares_at_most_every_interval_and_shows_the_others_bytes(monkeypatch) -> None:
    """One process's bytes reach the shared counter once per interval and at close; it shows its own plus the others'."""
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    counter = {"job": 1000}              # another process already added 1000 bytes
    added: list[int] = []

    def add(n: int) -> int:
        added.append(n)
        counter["job"] += n
        return counter["job"]

    shown: list[int] = []
    job = progress.JobBytes(add, shown.append, every=1.0)
    job.update(10)                       # not due yet: its own bytes only
    clock.now += 1
    job.update(30)                       # due: adds 30, learns of the other's 1000
    counter["job"] += 500                # the other process adds 500 more
    job.update(20)                       # a thread reporting late: never backwards
    job.update(40)                       # not due: the others as last heard
    assert added == [30] and shown == [10, 1030, 1030, 1040]
    job.close()                          # its part is done: the last 10 bytes
    assert added == [30, 10] and job.shared and job.mine == 40
    assert counter["job"] == 1540


def test_job_bytes_of_a_process_that_wrote_nothing_adds_nothing() -> None:
    job = progress.JobBytes(lambda n: pytest.fail("nothing to add"))   # type: ignore[arg-type,return-value]
    job.close()
    assert not job.shared
