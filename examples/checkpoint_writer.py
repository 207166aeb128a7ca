"""A small N-1 checkpoint writer on the burst tier: every rank writes its slice of one shared file.

Run it under MPI::

    mpiexec -n 4 python examples/checkpoint_writer.py --bfs-root /scratch/me/ckpt --steps 3

Inside ``mpiburst run`` (or any job whose tier is already started and named by
``$MPIBURST_CONF`` / ``$MPIBURST_ID``) it uses that tier; otherwise it starts
one for the job itself with ``Tier.start(comm)`` and stops it at the end.

Each step writes ``--mib`` MiB per rank as records of ``--record`` bytes
(default 47,008: unaligned on purpose), strided across ranks, through
``mpiburst.File``; then ``mpiburst.sync`` flushes the file to the BFS (all
ranks share the work), and rank 0 checks the flushed bytes against what every
rank wrote. The only differences from a plain mpi4py writer are the import
and the ``burst://`` path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import mpiburst
from mpiburst import File, MpiburstError, Tier


def record(step: int, index: int, size: int) -> np.ndarray:
    """The bytes of record ``index`` of checkpoint ``step`` (reproducible, so any rank can check it)."""
    return np.random.default_rng([step, index]).integers(0, 256, size, dtype=np.uint8)


def write_checkpoint(comm: MPI.Comm, step: int, nrec: int, size: int) -> str:
    """Write checkpoint ``step`` collectively; return its ``burst://`` URL."""
    url = f"burst://ckpt/step-{step:04d}.dat"
    f = File.Open(comm, url, MPI.MODE_CREATE | MPI.MODE_WRONLY)
    for i in range(comm.Get_rank(), nrec, comm.Get_size()):   # strided N-1 pattern
        f.Write_at(i * size, record(step, i, size))
    f.Close()                                                 # pushes this rank's buffered records
    return url


def verify(path: str, step: int, nrec: int, size: int) -> str | None:
    """Check the BFS file ``path`` record by record; return what is wrong, or None."""
    if os.path.getsize(path) != nrec * size:
        return f"{path} has {os.path.getsize(path)} bytes, expected {nrec * size}."
    with open(path, "rb") as fh:
        for i in range(nrec):
            if fh.read(size) != record(step, i, size).tobytes():
                return f"record {i} of {path} differs from what was written."
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bfs-root", default=os.getcwd(), help="BFS directory for the checkpoints (a new tier only)")
    parser.add_argument("--steps", type=int, default=2, help="number of checkpoints (default 2)")
    parser.add_argument("--mib", type=float, default=4, help="MiB written per rank and step (default 4)")
    parser.add_argument("--record", type=int, default=47_008, help="record size in bytes (default 47008)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    own = not (os.environ.get("MPIBURST_CONF") or os.environ.get("MPIBURST_ID"))
    try:
        if own:
            os.makedirs(os.path.join(args.bfs_root, "ckpt"), exist_ok=True)
            tier = Tier.start(comm, id=f"ckpt{os.getpid() if rank == 0 else 0}", dir=args.bfs_root,
                              bfs_root=args.bfs_root, capacity="25%")
        else:
            tier = Tier.current()
            os.makedirs(os.path.join(tier.bfs_root, "ckpt"), exist_ok=True)
        nrec = max(1, int(args.mib * nprocs * (1 << 20)) // args.record)
        try:
            for step in range(args.steps):
                t0 = time.perf_counter()
                url = write_checkpoint(comm, step, nrec, args.record)
                t1 = time.perf_counter()
                report = mpiburst.sync(url, comm=comm)             # collective flush to the BFS
                t2 = time.perf_counter()
                problem = None
                if rank == 0:
                    problem = verify(report.path, step, nrec, args.record)
                problem = comm.bcast(problem, root=0)      # every rank stops together on a bad checkpoint
                if problem:
                    raise SystemExit(f"checkpoint_writer: {problem}")
                if rank == 0:
                    mib = nrec * args.record / (1 << 20)
                    print(f"step {step}: {mib:.1f} MiB written in {t1 - t0:.3f} s, flushed in {t2 - t1:.3f} s "
                          f"({report.writes} aligned writes), verified", flush=True)
        finally:
            if own:
                comm.Barrier()
                if rank == 0:
                    tier.stop()
                else:
                    tier.disconnect()
    except MpiburstError as exc:
        print(f"checkpoint_writer: {exc}", file=sys.stderr)
        comm.Abort(getattr(exc, "exit_code", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
