"""``mpiburst bench``: the benchmark of mpiburst against direct MPI-IO and the machine's limits.

Run under ``mpiexec -n N``. Options are checked before MPI starts, so a bad
option gives one line and no MPI noise. Once ranks are running, an error on
one rank aborts the whole job (after printing its one line), because the
other ranks would otherwise wait in a collective forever.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, MpiburstError


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
                   help="segmented, strided, nn, ckpt (the checkpoint loop), view (strided records through a "
                   "file view against Write_at) or files (many small files per rank, mdtest-like: create, stat, "
                   "read, remove rates and time until durable); repeat or comma-separate (default: all but view "
                   "and files)")
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
    p.add_argument("--steps", type=int, default=4,
                   help="ckpt: checkpoints per job, each of --size per rank (default: 4)")
    p.add_argument("--work", type=float, default=0.25, metavar="SECONDS",
                   help="ckpt: numpy work before each checkpoint, calibrated once to about SECONDS (default: 0.25)")
    p.add_argument("--flush-every", type=int, default=4, metavar="N",
                   help="ckpt: flush one checkpoint in N (mpiburst.Checkpoints), and direct MPI-IO writing one in N "
                        "as a second baseline (default: 4)")
    p.add_argument("--compute", action="append", metavar="MODE",
                   help="ckpt: the work between checkpoints: numpy (every rank busy) and/or idle (ranks wait on a "
                        "timer, the CPU free, as while a GPU computes); comma-separate (default: numpy,idle)")
    p.add_argument("--files", type=int, default=200, metavar="N",
                   help="files: files each rank makes per measurement, each of one --transfer size (default: 200; "
                   "sizes default to 4k,64k when only this pattern runs)")
    p.add_argument("--device", choices=("host", "cuda"), default="host",
                   help="cuda: measure writes from CUDA device memory (CuPy) to the tier against host memory and "
                   "the device-to-host copy limit, per --transfer, instead of the patterns (default: host)")
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "bench-plot",
        help="plot one or more 'mpiburst bench --json' runs (e.g. one per filesystem) into one PNG",
        description="Plot the runs saved by 'mpiburst bench --json', one row of panels per run, "
        "e.g. the same benchmark on a local disk and on a network filesystem.",
    )
    p.add_argument("png", metavar="OUT.png", help="the PNG to write")
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="JSON files written by 'mpiburst bench --json'")
    p.set_defaults(func=_bench_plot)


def _bench(args: argparse.Namespace) -> int:
    """Check the options, then run the benchmark on all ranks."""
    from ..bench import main

    opts = main.options(args.pattern, args.transfer, args.size, args.repeat, args.json, args.plot,
                        args.bfs_dir, args.capacity, args.server, args.steps, args.work, args.files,
                        args.flush_every, args.compute, args.device)
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


def _bench_plot(args: argparse.Namespace) -> int:
    """Plot the given runs' JSON into one PNG."""
    from ..bench import report

    runs = []
    for path in args.runs:
        try:
            runs.append(report.load(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a JSON file written by 'mpiburst bench --json' ({exc}); "
                              "give the files that option wrote.") from None
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.png))):
        raise ConfigError(f"{args.png}: its directory does not exist; create it or give another path.")
    try:
        import matplotlib  # noqa: F401 - only checking that the plot can work
    except ImportError:
        raise ConfigError("bench-plot needs matplotlib; install it with 'pip install mpiburst[bench]'.") from None
    report.plot(args.png, runs)
    print(f"wrote {args.png} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0
