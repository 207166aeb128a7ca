"""What I/O recording costs the write path: time per write call, recorded against unrecorded, in pairs.

Run it with the project's python (docs/report.md, "Overhead")::

    python scripts/record-cost.py --pairs 40 --transfer 4096 --pattern strided
    python scripts/record-cost.py --absorb --pairs 40 --transfer 4096 --pattern strided

``--calls`` writes of ``--transfer`` bytes, strided (a gap of one record
after each) or segmented (contiguous), with recording on and off
(``MPIBURST_IOSTATS``), the two in turn (which comes first alternates),
``--pairs`` times. It prints the medians per call of both and of the pairs'
differences (with their min and max), and the median of the pairs' ratios.

By default one handle (:class:`mpiburst.writeback.TierFile`, the default
4 MiB write-back buffer) receives the writes, then closes; its batches go to
a writer that drops them, so no server, socket or other process is
measured: this thread's CPU time (``time.thread_time_ns``), which includes
counting the calls in bulk. With ``--absorb``, the benchmark's absorb on a
real server (started here, stopped at the end): ``mpiburst.File`` Open,
``Write_at`` each record, Sync, Close on ``MPI.COMM_SELF``, in wall-clock
time, where the bulk count runs while the server stores a batch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from mpiburst.tier import Tier
from mpiburst.writeback import TierFile


class _Dropped:
    """A batch writer that drops every batch (stands in for the store's)."""

    def send(self, path: str, channel: int, payload: memoryview, extents: object) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def one(tier: Tier, offsets: list[int], data: memoryview, recorded: bool) -> int:
    """Return the CPU nanoseconds of writing ``data`` at each of ``offsets`` through one handle, and closing it."""
    os.environ["MPIBURST_IOSTATS"] = "1" if recorded else "0"
    tf = TierFile(tier, os.path.join(tier.bfs_root, "f"), 0)
    tf._writer.close()
    tf._writer = _Dropped()  # type: ignore[assignment]
    write = tf.write
    t0 = time.thread_time_ns()
    for offset in offsets:
        write(offset, data)
    tf.close()
    return time.thread_time_ns() - t0


def absorb(tier: Tier, offsets: list[int], data: memoryview, recorded: bool) -> int:
    """Return the wall-clock nanoseconds of the benchmark's absorb of ``data`` at each of ``offsets`` (a new file)."""
    from mpi4py import MPI

    from mpiburst.file import File

    os.environ["MPIBURST_IOSTATS"] = "1" if recorded else "0"
    url = f"burst://absorb-{int(recorded)}.dat"
    t0 = time.perf_counter_ns()
    f = File.Open(MPI.COMM_SELF, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    for offset in offsets:
        f.Write_at(offset, data)
    f.Sync()
    f.Close()
    spent = time.perf_counter_ns() - t0
    File.Delete(url)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--calls", type=int, default=16384)
    parser.add_argument("--transfer", type=int, default=4096)
    parser.add_argument("--pattern", choices=("strided", "segmented"), default="strided")
    parser.add_argument("--absorb", action="store_true", help="the benchmark's absorb on a real server, wall-clock")
    opts = parser.parse_args()
    step = opts.transfer * (2 if opts.pattern == "strided" else 1)
    offsets = [i * step for i in range(opts.calls)]
    data = memoryview(bytes(opts.transfer))
    on: list[float] = []
    off: list[float] = []
    scratch = tempfile.mkdtemp(prefix="record-cost-")
    if opts.absorb:
        os.mkdir(os.path.join(scratch, "bfs"))
        tier = Tier.start(id=f"rc{os.getpid()}", dir=scratch, bfs_root=os.path.join(scratch, "bfs"),
                          capacity=f"{max(256, 4 * opts.calls * step >> 20)}M")
        measure = absorb
    else:
        tier = Tier.memory(scratch)
        measure = one
    try:
        for i in range(opts.pairs):
            for recorded in ((True, False) if i % 2 else (False, True)):
                (on if recorded else off).append(measure(tier, offsets, data, recorded) / opts.calls)
    finally:
        if opts.absorb:
            tier.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    diff = [a - b for a, b in zip(on, off)]
    clock = "wall-clock" if opts.absorb else "CPU"
    print(f"{opts.pattern} {opts.transfer} B x {opts.calls} calls, {opts.pairs} pairs, {clock} ns per call: "
          f"recorded {statistics.median(on):.0f}, unrecorded {statistics.median(off):.0f}, "
          f"difference {statistics.median(diff):.1f} (min {min(diff):.1f}, max {max(diff):.1f}), "
          f"ratio unrecorded/recorded {statistics.median(b / a for a, b in zip(on, off)):.4f}")


if __name__ == "__main__":
    main()
