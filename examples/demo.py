"""mpiburst demo: MPI ranks write one shared file through a per-job fast tier.

Run with ``bash examples/demo.sh`` (4 ranks). Rank 0 starts a private
redis/valkey server for the job (``Tier.start`` is collective). Every rank
writes strided, unaligned 47,008-byte records to ``burst://demo/output.dat``
through :class:`mpiburst.File` (the names of ``mpi4py.MPI.File``), the ranks
read each other's records back from the tier, :func:`mpiburst.sync` flushes
the file to the backing filesystem as large aligned writes, and the tier is
stopped when the ``with`` block ends. The same write phase is timed with
plain MPI-IO on the same filesystem for comparison.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
from mpi4py import MPI

import mpiburst
from mpiburst.sizes import format_size

RECORD = 47_008
RECORDS = 256


def record(index: int) -> np.ndarray:
    """Return the bytes of record ``index`` (its content depends on its index only)."""
    return np.full(RECORD, index % 251, dtype=np.uint8)


def write_strided(opener, path: str, comm: MPI.Comm) -> float:
    """Write this rank's strided records through ``opener`` (File.Open); return the slowest rank's time."""
    rank, size = comm.Get_rank(), comm.Get_size()
    comm.Barrier()
    start = time.perf_counter()
    f = opener(comm, path, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    for i in range(RECORDS):
        index = i * size + rank
        f.Write_at(index * RECORD, record(index))
    f.Sync()
    f.Close()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    workdir = comm.bcast(tempfile.mkdtemp(prefix="mpiburst-demo-") if rank == 0 else None)
    bfs = os.path.join(workdir, "bfs")
    if rank == 0:
        os.mkdir(bfs)
    comm.Barrier()
    total = size * RECORDS * RECORD
    try:
        with mpiburst.Tier.start(comm, id="demo", dir=workdir, bfs_root=bfs, capacity="512M") as tier:
            if rank == 0:
                state = tier.status()
                print(f"tier up: {state['engine']}, {size} ranks, {tier.channels} channels, "
                      f"capacity {format_size(tier.capacity)}, flush alignment {format_size(tier.align)}")
            absorb = write_strided(mpiburst.File.Open, "burst://demo/output.dat", comm)

            # Every rank reads its neighbour's records back (from the tier: nothing is on the BFS yet).
            peer = (rank + 1) % size
            f = mpiburst.File.Open(comm, "burst://demo/output.dat", MPI.MODE_RDONLY)
            got = np.empty(RECORD, dtype=np.uint8)
            ok = True
            for i in range(RECORDS):
                index = i * size + peer
                f.Read_at(index * RECORD, got)
                ok &= bool(np.array_equal(got, record(index)))
            f.Close()

            start = time.perf_counter()
            report = mpiburst.sync("burst://demo/output.dat", comm=comm)
            flush = time.perf_counter() - start
            direct = write_strided(MPI.File.Open, os.path.join(bfs, "direct.dat"), comm)
            with open(os.path.join(bfs, "demo", "output.dat"), "rb") as out:
                out.seek(rank * RECORD)
                ok &= out.read(RECORD) == record(rank).tobytes()
            ok = comm.allreduce(ok, op=MPI.LAND)
            if rank == 0:
                print(f"{size} ranks wrote {format_size(total)} as {RECORD}-byte strided records:")
                print(f"  through the tier  {absorb:.3f} s ({format_size(total / absorb)}/s)")
                print(f"  direct MPI-IO     {direct:.3f} s ({format_size(total / direct)}/s)")
                print(f"  flush to the BFS  {flush:.3f} s in {report.writes} aligned writes")
                print("ranks read each other's records from the tier, and the BFS file: "
                      + ("OK" if ok else "MISMATCH"))
        if rank == 0:
            print("tier stopped; demo done")
        return 0 if ok else 1
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
