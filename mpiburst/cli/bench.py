"""``mpiburst bench``: the benchmark of mpiburst against direct MPI-IO and the machine's limits.

Run under ``mpiexec -n N``. Options are checked before MPI starts, so a bad
option gives one line and no MPI noise. Once ranks are running, an error on
one rank aborts the whole job (after printing its one line), because the
other ranks would otherwise wait in a collective forever.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MpiburstError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    p = sub.add_parser(
        "bench",
        help="measure mpiburst against direct MPI-IO and the machine's limits (run under mpiexec)",
        description="IOR-style benchmark, run as 'mpiexec -n N mpiburst bench ...'. For each pattern and transfer "
        "size it measures memcpy, the tier's raw ingest and read-out, the BFS's raw write with fsync, direct MPI-IO "
        "(Write_at, Write_at_all) and mpiburst (absorb, flush, end-to-end) on the same bytes, and prints one table "
        "with bandwidths (GB/s, median of --repeat runs) and ratios.",
    )
    p.add_argument("--pattern", action="append", metavar="P",
                   help="segmented, strided or nn; repeat or comma-separate (default: all three)")
    p.add_argument("--transfer", action="append", metavar="SIZE",
                   help="bytes per write call; repeat or comma-separate (default: 4k,47008,1m,16m)")
    p.add_argument("--size", default="64m", help="bytes written by each rank per measurement (default: 64m)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; figures are medians (default: 3)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="also plot bandwidth against transfer size to FILE.png")
    p.add_argument("--bfs-dir", default=".", metavar="DIR",
                   help="directory on the backing filesystem for the scratch files (default: the current one)")
    p.add_argument("--capacity", default="4G", help="memory of the benchmark's tier (default: 4G)")
    p.add_argument("--server", metavar="PATH",
                   help="redis-server or valkey-server binary for the tier (default: found as 'mpiburst start' does)")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    """Check the options, then run the benchmark on all ranks."""
    from ..bench import main

    opts = main.options(args.pattern, args.transfer, args.size, args.repeat, args.json, args.plot,
                        args.bfs_dir, args.capacity, args.server)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    main.check_capacity(opts, comm.size)  # the same verdict on every rank: a plain error, no abort
    try:
        return main.run(opts)
    except MpiburstError as exc:
        if comm.size == 1:
            raise
        print(f"mpiburst bench: rank {comm.rank}: {exc}", file=sys.stderr, flush=True)
        comm.Abort(exc.exit_code)
    except BaseException:
        if comm.size == 1:
            raise
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    return 1  # not reached: Abort ends the process
