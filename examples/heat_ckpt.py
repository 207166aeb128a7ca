"""A 1-D heat stencil that checkpoints with mpiburst.Checkpoints and restarts from its newest checkpoint.

The rod has ``--points`` points split over the ranks (any number: a restart
may use another); every step each rank trades its edge values with its
neighbours and applies ``u += ALPHA * (left - 2 u + right)``, the same
arithmetic per point whatever the split, so the result is exact. Every
``--every`` steps the ranks save ``u.dat`` (each writes its slice) as
checkpoint ``step`` of ``--name``; the tier keeps ``--keep`` of them and one
in ``--flush-every`` goes to the BFS in the background. The last step is
saved with ``output=True`` (always flushed): ``<name>/ckpt.<steps>/u.dat``
is the result.

On start it restores the newest complete checkpoint (the tier's, or the
BFS's after the tier was lost). ``should_exit()`` stops it early for
``mpiburst halt`` or the batch system's time limit, with the last
checkpoint flushed. Run it through mpiburst::

    mpiburst run --id heat -- mpiexec -n 4 python heat_ckpt.py --steps 200 --every 10

If the job is killed, ``mpiburst run`` keeps the tier's data; the same
command again (same ``--id``) reloads it and the program resumes from its
newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

import mpiburst

#: The diffusion number (stable below 0.5).
ALPHA = 0.25


def bounds(points: int, size: int, rank: int) -> tuple[int, int]:
    """Return the half-open range of points that ``rank`` of ``size`` owns."""
    q, r = divmod(points, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def initial(points: int) -> np.ndarray:
    """Return the whole rod at step 0: a warm middle, cold ends (deterministic)."""
    x = np.linspace(0.0, 1.0, points)
    return np.sin(np.pi * x) + (np.abs(x - 0.5) < 0.1)


def advance(ext: np.ndarray) -> np.ndarray:
    """Return one step of the interior of ``ext`` (a slice with one ghost value at each end)."""
    return ext[1:-1] + ALPHA * (ext[:-2] - 2.0 * ext[1:-1] + ext[2:])


def step(comm: MPI.Comm, u: np.ndarray) -> np.ndarray:
    """Trade edge values with the neighbours (zero beyond the rod's ends) and advance one step."""
    rank, size = comm.Get_rank(), comm.Get_size()
    ext = np.zeros(len(u) + 2)
    ext[1:-1] = u
    left = rank - 1 if rank > 0 else MPI.PROC_NULL
    right = rank + 1 if rank < size - 1 else MPI.PROC_NULL
    comm.Sendrecv(u[-1:], dest=right, recvbuf=ext[:1], source=left)
    comm.Sendrecv(u[:1], dest=left, recvbuf=ext[-1:], source=right)
    return advance(ext)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the simulation; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="total steps")
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--points", type=int, default=1 << 16, help="points of the rod (all ranks)")
    p.add_argument("--name", default="heat", help="the checkpoints' directory under the BFS root")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in the tier")
    p.add_argument("--flush-every", type=int, default=4, help="flush one checkpoint in N to the BFS")
    p.add_argument("--step-time", type=float, default=0.0, help="seconds each step sleeps (to watch it)")
    args = p.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    lo, hi = bounds(args.points, comm.Get_size(), rank)
    say = print if rank == 0 else (lambda *a, **k: None)
    with mpiburst.Checkpoints(comm, args.name, keep=args.keep, flush_every=args.flush_every) as ck:
        start = ck.latest() or 0
        if start:
            with ck.restore(start) as c:
                u = np.empty(hi - lo)
                f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_RDONLY)
                f.Read_at_all(lo * 8, u)
                f.Close()
            start = c.step
            say(f"restarted from checkpoint {start}", flush=True)
        else:
            u = initial(args.points)[lo:hi].copy()
        for n in range(start + 1, args.steps + 1):
            u = step(comm, u)
            time.sleep(args.step_time)
            if n % args.every and n != args.steps:
                continue
            with ck.save(n, output=n == args.steps) as c:
                f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_WRONLY | MPI.MODE_CREATE)
                f.Write_at_all(lo * 8, u)
                f.Close()
            say(f"checkpoint {n} saved{' (flushing)' if c.flushing else ''}", flush=True)
            if ck.should_exit():
                say(f"stopping after checkpoint {n}: {ck.exit_reason}", flush=True)
                break
    say("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
