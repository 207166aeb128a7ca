"""The server job of a multi-node ``mpiburst run``: one process per node keeping its node's server.

``mpiburst run`` on an allocation of several nodes launches, in the
background, ``python -m mpiburst.nodeserve`` with one rank per node (``srun
--ntasks-per-node=1`` under Slurm, else ``mpiexec -ppn 1``; ``$MPIBURST_NODE_LAUNCH``
overrides the launcher). Its ranks start the run together
(:func:`mpiburst.tier.start_nodes`: each its node's cluster-mode server, rank
0 the cluster, the conf and the engine), then each waits for its server to
end: ``mpiburst stop`` (or ``run`` finishing) shuts the servers down and the
job ends by itself. Each server is tied to its rank, so a killed job step
leaves no server behind.

The run's rank ranges are the *application's* (``--channels`` ranks in
blocks of ``--ranks-per-node``), not this job's, so every application rank
finds its own node's server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import MpiburstError
from .nodes import app_ranges
from .server import StartOptions, wait_exit
from .tier import start_nodes


def main(argv: Sequence[str] | None = None) -> int:
    """Start this node's server with the others, then wait until it ends (one rank per node)."""
    parser = argparse.ArgumentParser(prog="python -m mpiburst.nodeserve")
    parser.add_argument("--options", required=True, help="the run's StartOptions as JSON (no secrets)")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="the application's ranks per node")
    parser.add_argument("--lock-held", action="store_true", help="the launching process holds the run's start lock")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        opts = StartOptions.of(json.loads(args.options))
        ranges = app_ranges(opts.channels or size, size, args.ranks_per_node)
        conf = start_nodes(comm, opts, rank, ranges, leader=True, take_lock=not args.lock_held)
    except MpiburstError as exc:
        if rank == 0:
            print(f"mpiburst: {exc}", file=sys.stderr)
        return exc.exit_code or 1
    wait_exit(conf.nodes[rank]["pid"], conf.server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
