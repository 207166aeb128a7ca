"""A parallel HDF5 writer with the serial h5py wheel: every rank writes its block through the tier.

Run it under MPI (it starts and stops its own tier):

    mpiexec -n 4 python examples/h5_parallel_writer.py --dir /tmp/h5demo --steps 3

Each step is a 2-D field ``steps/<k>/T`` decomposed by rows and a 3-D field
``steps/<k>/rho`` decomposed by blocks of the first two axes. Rank 0 lays the
file out (``mpiburst.h5.parallel_create``); every rank writes its own part;
the file is flushed to the BFS at close and rank 0 checks it with plain h5py.
Keep the tier running instead (``mpiburst start`` + ``$MPIBURST_CONF``) to
let ``examples/h5_analysis.py`` read the output before it is flushed.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from mpi4py import MPI

from mpiburst import h5 as mh5
from mpiburst.tier import Tier


def part(n: int, rank: int, size: int) -> slice:
    """Rows ``[rank*n/size, (rank+1)*n/size)`` of an axis of ``n``."""
    return slice(rank * n // size, (rank + 1) * n // size)


def field(step: int, shape: tuple[int, ...]) -> np.ndarray:
    """The whole field of a step (every rank can compute it, so rank 0 can check the file)."""
    return np.fromfunction(lambda *ix: step + sum((i + 1) * x for i, x in enumerate(ix)), shape)


def write(comm: MPI.Comm, name: str, steps: int, nx: int) -> None:
    """Write ``steps`` steps of a 2-D and a 3-D field from every rank of ``comm``."""
    rank, size = comm.Get_rank(), comm.Get_size()
    shape2, shape3 = (nx, 2 * nx), (nx, nx, 8)
    datasets = {}
    for k in range(steps):
        datasets[f"steps/{k}/T"] = {"shape": shape2, "dtype": "f8", "attrs": {"units": "K"}}
        datasets[f"steps/{k}/rho"] = (shape3, "f4")
    pf = mh5.parallel_create(name, comm, datasets, attrs={"/": {"code": "demo", "ranks": size}})
    rows = part(nx, rank, size)
    bi, bj = divmod(rank, max(1, size // 2)) if size % 2 == 0 else (rank, 0)
    nbi, nbj = (2, size // 2) if size % 2 == 0 else (size, 1)
    block = (part(nx, bi, nbi), part(nx, bj, nbj), slice(None))
    for k in range(steps):
        pf.write(f"steps/{k}/T", rows, field(k, shape2)[rows])
        pf.write(f"steps/{k}/rho", block, field(k, shape3)[block])
    report = pf.close(sync=True)
    if rank == 0:
        print(f"wrote {report.size} bytes to {report.path} in {report.writes} write(s) to the BFS")


def check(path: str, steps: int, nx: int) -> None:
    """Read the flushed file with plain h5py and compare with the expected fields."""
    import h5py

    with h5py.File(path, "r") as f:
        for k in range(steps):
            assert np.array_equal(f[f"steps/{k}/T"][()], field(k, (nx, 2 * nx)))
            assert np.array_equal(f[f"steps/{k}/rho"][()], field(k, (nx, nx, 8)).astype("f4"))
    print(f"plain h5py read back every step of {path}: OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="h5demo", help="run directory; the BFS root is DIR/bfs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nx", type=int, default=64)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    bfs = os.path.abspath(os.path.join(args.dir, "bfs"))
    if comm.Get_rank() == 0:
        os.makedirs(bfs, exist_ok=True)
    comm.Barrier()
    with Tier.start(comm, id="h5demo", dir=os.path.abspath(args.dir), bfs_root=bfs, capacity="256M"):
        write(comm, "burst://sim.h5", args.steps, args.nx)
        if comm.Get_rank() == 0:
            check(os.path.join(bfs, "sim.h5"), args.steps, args.nx)


if __name__ == "__main__":
    main()
