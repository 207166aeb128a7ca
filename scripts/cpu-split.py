"""Where the CPU goes when a shared file is written to the BFS: mpiburst's absorb and flush, the raw write, direct MPI-IO.

Run it under MPI on the BFS to measure (docs/benchmarks.md, "Where the time
goes")::

    mpiexec -n 2 python scripts/cpu-split.py --bfs-dir "$(scripts/dfs.sh up)" --transfer 1m --size 32m --repeat 5

Each rank writes ``--size`` bytes of ``--transfer``-sized strided records
into one shared file four ways, one after the other, ``--repeat`` times:
through mpiburst (absorb: ``mpiburst.File`` Open, ``Write_at`` per record,
Sync, Close; then flush: ``mpiburst.sync``), the raw shared write (each rank
its contiguous domain in 8 MiB ``pwrite`` blocks, ``fdatasync``), and direct
MPI-IO (``MPI.File`` ``Write_at`` per record, Sync, Close). Around every phase
(barrier before and after) it reads the CPU seconds (user + system) of the
ranks (``time.process_time``, every thread), of the tier's server and of
every process named ``glusterfsd`` (the bricks) or ``glusterfs`` (the FUSE
client) from ``/proc/PID/stat``; it prints the median of each, with the
phase's wall time. Other processes' work on a shared machine lands in none
of these columns, but it slows the wall time.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import tempfile
import time

from mpi4py import MPI

import mpiburst
from mpiburst.bench.burst import _absorb
from mpiburst.bench.patterns import Layout, rank_data, records
from mpiburst.sizes import parse_size

HZ = os.sysconf("SC_CLK_TCK")
DAEMONS = ("glusterfsd", "glusterfs")


def _ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _daemons() -> dict[str, int]:
    out = dict.fromkeys(DAEMONS, 0)
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name in out:
            fields = stat[stat.rindex(")") + 2:].split()
            out[name] += int(fields[11]) + int(fields[12])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bfs-dir", required=True)
    parser.add_argument("--transfer", default="1m")
    parser.add_argument("--size", default="32m")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    transfer, size = parse_size(args.transfer, "--transfer"), parse_size(args.size, "--size")
    scratch = comm.bcast(tempfile.mkdtemp(dir=args.bfs_dir, prefix="cpu-split-") if comm.rank == 0 else None)
    rundir = comm.bcast(tempfile.mkdtemp(prefix="cpu-split-") if comm.rank == 0 else None)
    layout = Layout("strided", transfer, size, comm.size, comm.rank)
    recs = records(layout, rank_data(layout))
    block = bytearray(os.urandom(8 << 20))
    phases: dict[str, list[dict[str, float]]] = {}
    try:
        with mpiburst.Tier.start(comm, id="cpusplit", bfs_root=scratch, capacity="2G", dir=rundir) as tier:

            def snap() -> dict[str, float]:
                now = {k: v / HZ for k, v in _daemons().items()} if comm.rank == 0 else dict.fromkeys(DAEMONS, 0.0)
                now["server"] = _ticks(tier.conf.pid) / HZ if comm.rank == 0 else 0.0
                now["ranks"] = comm.allreduce(time.process_time())
                now["wall"] = MPI.Wtime()
                return now

            def raw(path: str) -> None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                for off in range(0, layout.rank_bytes, len(block)):
                    n = min(len(block), layout.rank_bytes - off)
                    os.pwrite(fd, memoryview(block)[:n], comm.rank * layout.rank_bytes + off)
                os.fdatasync(fd)
                os.close(fd)

            def direct(path: str) -> None:
                f = MPI.File.Open(comm, path, MPI.MODE_WRONLY | MPI.MODE_CREATE)
                for off, buf in recs:
                    f.Write_at(off, buf)
                f.Sync()
                f.Close()

            for i in range(args.repeat):
                url = f"burst://f{i}.dat"
                steps = [("absorb", lambda: _absorb(comm, url, recs)),
                         ("flush", lambda: mpiburst.sync(url, comm=comm)),
                         ("raw-shared", lambda: raw(os.path.join(scratch, f"raw{i}"))),
                         ("direct", lambda: direct(os.path.join(scratch, f"direct{i}")))]
                for name, step in steps:
                    comm.Barrier()
                    before = snap()
                    step()
                    comm.Barrier()
                    after = snap()
                    phases.setdefault(name, []).append({k: after[k] - before[k] for k in before})
                comm.Barrier()
                if comm.rank == 0:
                    mpiburst.File.Delete(url)
                    for name in (f"raw{i}", f"direct{i}"):
                        os.unlink(os.path.join(scratch, name))
                comm.Barrier()
    finally:
        if comm.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(rundir, ignore_errors=True)
    if comm.rank == 0:
        cols = ["wall", "ranks", "server", *DAEMONS, "total cpu"]
        print(f"{comm.size} ranks, strided {args.transfer} records, {args.size} per rank, median of {args.repeat}; "
              "seconds")
        print(f"{'phase':11s}" + "".join(f"{c:>11s}" for c in cols))
        for name, samples in phases.items():
            for s in samples:
                s["total cpu"] = s["ranks"] + s["server"] + sum(s[d] for d in DAEMONS)
            print(f"{name:11s}" + "".join(f"{statistics.median(s[c] for s in samples):11.3f}" for c in cols))


if __name__ == "__main__":
    main()
