"""mpiburst demo: every MPI rank writes its output through a per-job fast tier.

Run with ``bash examples/demo.sh`` (4 ranks). Rank 0 starts a private
redis/valkey server for the job (``Tier.start`` is collective), each rank
appends its records to its own channel, the ranks check each other's data, and
the tier is stopped when the ``with`` block ends. Until the File driver lands
this demo writes through the tier's raw Redis connection.
"""

from __future__ import annotations

import shutil
import tempfile
import time

from mpi4py import MPI

from mpiburst.sizes import format_size
from mpiburst.tier import Tier

RECORD = 64 * 1024
RECORDS = 128


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    workdir = comm.bcast(tempfile.mkdtemp(prefix="mpiburst-demo-") if rank == 0 else None)
    try:
        with Tier.start(comm, id="demo", dir=workdir, capacity="512M") as tier:
            if rank == 0:
                state = tier.status()
                print(f"tier up: {state['engine']}, {size} ranks, {tier.channels} channels, "
                      f"capacity {format_size(tier.capacity)}, pid {state['pid']}")
            key = f"demo:{{ch{rank}}}".encode()
            record = bytes([rank % 256]) * RECORD
            comm.Barrier()
            start = time.perf_counter()
            pipe = tier.redis.pipeline(transaction=False)
            for _ in range(RECORDS):
                pipe.append(key, record)
            pipe.execute()
            comm.Barrier()
            elapsed = comm.reduce(time.perf_counter() - start, op=MPI.MAX)
            peer = (rank + 1) % size
            got = tier.redis.get(f"demo:{{ch{peer}}}".encode())
            ok = got == bytes([peer % 256]) * (RECORD * RECORDS)
            ok = comm.allreduce(ok, op=MPI.LAND)
            if rank == 0:
                total = size * RECORD * RECORDS
                used = tier.status()["used_memory"]
                print(f"wrote {format_size(total)} in {elapsed:.3f} s "
                      f"({format_size(total / elapsed)}/s); tier memory used {format_size(used)}")
                print("every rank read its neighbour's channel back: " + ("OK" if ok else "MISMATCH"))
        if rank == 0:
            print("tier stopped; demo done")
        return 0 if ok else 1
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
