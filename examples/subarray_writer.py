"""A 2-D domain decomposition written the way MPI-IO codes do it: one subarray view, one Write_all.

Run it under MPI::

    mpiexec -n 4 python examples/subarray_writer.py --bfs-root /scratch/me/grid --rows 512 --cols 384

The global ``rows x cols`` array of doubles is split over a 2-D process grid
(``MPI.Compute_dims``); each rank holds its block with a one-cell halo, and
describes both sides with datatypes: the file view is a subarray of the
global array, the memory buffer a subarray of the haloed local block. One
collective ``Write_all`` writes the whole array, ``mpiburst.sync`` flushes it
to the BFS, and rank 0 checks the BFS file against the array every rank can
compute. Each rank then reads its block back through the same view. The only
differences from a plain mpi4py program are the import and the ``burst://``
path (inside ``mpiburst run`` the job's tier is used; otherwise one is
started for the run).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

import mpiburst
from mpiburst import File, MpiburstError, Tier


def global_array(rows: int, cols: int) -> np.ndarray:
    """The array the ranks write together: element (i, j) = i * cols + j."""
    return np.arange(rows * cols, dtype=np.float64).reshape(rows, cols)


def block(n: int, parts: int, coord: int) -> tuple[int, int]:
    """Return (start, size) of part ``coord`` of ``n`` cells split into ``parts`` nearly equal parts."""
    base, extra = divmod(n, parts)
    return coord * base + min(coord, extra), base + (coord < extra)


def write_and_check(comm: MPI.Comm, rows: int, cols: int) -> str | None:
    """Write the array through a subarray view, flush it, check it; return what is wrong, or None."""
    dims = MPI.Compute_dims(comm.Get_size(), 2)
    cart = comm.Create_cart(dims)
    (r0, nr), (c0, nc) = [block(n, p, c) for n, p, c in zip((rows, cols), dims, cart.Get_coords(cart.Get_rank()))]
    local = np.zeros((nr + 2, nc + 2))                     # the rank's block inside a one-cell halo
    local[1:-1, 1:-1] = global_array(rows, cols)[r0:r0 + nr, c0:c0 + nc]
    filetype = MPI.DOUBLE.Create_subarray([rows, cols], [nr, nc], [r0, c0]).Commit()
    memtype = MPI.DOUBLE.Create_subarray([nr + 2, nc + 2], [nr, nc], [1, 1]).Commit()
    url = "burst://grid/array.f64"
    try:
        f = File.Open(cart, url, MPI.MODE_CREATE | MPI.MODE_RDWR)
        f.Set_view(0, MPI.DOUBLE, filetype)
        f.Write_all([local, 1, memtype])                   # one collective call, no halo bytes written
        f.Sync()
        cart.Barrier()
        f.Sync()
        back = np.full((nr + 2, nc + 2), -1.0)
        f.Read_at_all(0, [back, 1, memtype])
        f.Close()
    finally:
        filetype.Free()
        memtype.Free()
    report = mpiburst.sync(url, comm=cart)
    problem = None
    if not np.array_equal(back[1:-1, 1:-1], local[1:-1, 1:-1]) or (back[0] != -1).any():
        problem = f"rank {cart.Get_rank()} read back other bytes than it wrote."
    if cart.Get_rank() == 0 and problem is None:
        on_disk = np.fromfile(report.path, dtype=np.float64)
        if on_disk.size != rows * cols or not np.array_equal(on_disk.reshape(rows, cols), global_array(rows, cols)):
            problem = f"{report.path} does not hold the {rows} x {cols} array."
    problems = [p for p in cart.allgather(problem) if p]
    cart.Free()
    return problems[0] if problems else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bfs-root", default=os.getcwd(), help="BFS directory for the array (a new tier only)")
    parser.add_argument("--rows", type=int, default=256, help="global rows (default 256)")
    parser.add_argument("--cols", type=int, default=192, help="global columns (default 192)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    own = not (os.environ.get("MPIBURST_CONF") or os.environ.get("MPIBURST_ID"))
    try:
        if own:
            os.makedirs(os.path.join(args.bfs_root, "grid"), exist_ok=True)
            tier = Tier.start(comm, id=f"grid{os.getpid() if rank == 0 else 0}", dir=args.bfs_root,
                              bfs_root=args.bfs_root, capacity="25%")
        else:
            tier = Tier.current()
            os.makedirs(os.path.join(tier.bfs_root, "grid"), exist_ok=True)
        try:
            problem = write_and_check(comm, args.rows, args.cols)
        finally:
            if own:
                comm.Barrier()
                if rank == 0:
                    tier.stop()
                else:
                    tier.disconnect()
    except MpiburstError as exc:
        print(f"subarray_writer: {exc}", file=sys.stderr)
        comm.Abort(getattr(exc, "exit_code", 1))
    if problem:
        print(f"subarray_writer: {problem}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"subarray_writer: {args.rows} x {args.cols} doubles written by {comm.Get_size()} ranks through "
              "one subarray view, flushed and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
