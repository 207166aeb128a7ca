"""Checkpoint / restart through the tier: a numpy simulation that survives being killed.

Each rank owns ``--size`` float64 values. Every ``--every`` steps all ranks
write their slice of the state into ``burst://<dir>/ckpt_<step>.bin`` with
``mpiburst.File`` (one ``Write_at_all`` per rank), close it, and rank 0 then
records the step in ``burst://<dir>/latest``: a checkpoint named there is
complete. On start the program reads ``latest`` (from the tier if a failed
run's data was reloaded, else from the BFS) and resumes from that checkpoint.
At the end it writes ``burst://<dir>/result.bin``.

Run it through mpiburst (the tier is started, staged out and stopped for you)::

    mpiburst run --id sim -- mpiexec -n 4 python checkpoint_restart.py --steps 100 --every 10

If the job dies, ``mpiburst run`` keeps the tier's data; running the same
command again with the same ``--id`` reloads it and the program resumes from
its last checkpoint. ``--fail-at STEP`` simulates a crash for trying this.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

import mpiburst


def initial(rank: int, size: int) -> np.ndarray:
    """Return rank ``rank``'s starting state (deterministic, so a test can recompute it)."""
    return np.arange(rank * size, (rank + 1) * size, dtype=np.float64)


def step(state: np.ndarray, n: int) -> np.ndarray:
    """Advance the state by one step (deterministic and cheap)."""
    return state * 0.5 + n


def latest_step(comm: MPI.Comm, directory: str) -> int:
    """Return the step of the last complete checkpoint, 0 if there is none (collective)."""
    try:
        f = mpiburst.File.Open(comm, f"{directory}/latest", MPI.MODE_RDONLY)
    except MPI.Exception:
        return 0
    buf = np.zeros(1, dtype=np.int64)
    f.Read_at_all(0, buf)
    f.Close()
    return int(buf[0])


def save(comm: MPI.Comm, directory: str, n: int, state: np.ndarray) -> None:
    """Write checkpoint ``n`` (every rank its slice), then mark it complete in ``latest``."""
    f = mpiburst.File.Open(comm, f"{directory}/ckpt_{n:06d}.bin", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    f.Write_at_all(comm.Get_rank() * state.nbytes, state)
    f.Close()
    mark = mpiburst.File.Open(comm, f"{directory}/latest", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    if comm.Get_rank() == 0:
        mark.Write_at(0, np.array([n], dtype=np.int64))
    mark.Close()


def load(comm: MPI.Comm, directory: str, n: int, size: int) -> np.ndarray:
    """Read this rank's slice of checkpoint ``n``."""
    state = np.empty(size, dtype=np.float64)
    f = mpiburst.File.Open(comm, f"{directory}/ckpt_{n:06d}.bin", MPI.MODE_RDONLY)
    f.Read_at_all(comm.Get_rank() * state.nbytes, state)
    f.Close()
    return state


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the simulation; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="total steps")
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--size", type=int, default=1 << 16, help="float64 values per rank")
    p.add_argument("--dir", default="burst://sim", help="burst:// directory of the checkpoints and result")
    p.add_argument("--step-time", type=float, default=0.0, metavar="SECONDS",
                   help="simulated compute time per step")
    p.add_argument("--fail-at", type=int, default=None, metavar="STEP", help="exit 1 after this step (test)")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    start = latest_step(comm, args.dir)
    state = load(comm, args.dir, start, args.size) if start else initial(rank, args.size)
    if rank == 0:
        print(f"{'resuming from step ' + str(start) if start else 'starting'} on {comm.Get_size()} ranks",
              flush=True)
    for n in range(start + 1, args.steps + 1):
        state = step(state, n)
        time.sleep(args.step_time)
        if n % args.every == 0:
            save(comm, args.dir, n, state)
        if args.fail_at == n:
            if rank == 0:
                print(f"simulated crash after step {n}", flush=True)
            return 1
    f = mpiburst.File.Open(comm, f"{args.dir}/result.bin", MPI.MODE_WRONLY | MPI.MODE_CREATE)
    f.Write_at_all(rank * state.nbytes, state)
    f.Close()
    if rank == 0:
        print(f"done: {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
