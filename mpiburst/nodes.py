"""Which ranks of a communicator share a node: the nodes a run's servers go on.

A node is a group of ``comm.Split_type(MPI.COMM_TYPE_SHARED)`` (the ranks
that share memory), or, when ``$MPIBURST_RANKS_PER_NODE`` is ``R``,
consecutive groups of ``R`` ranks (so one machine can act as several nodes:
tests, and the measurements of docs/scaling.md). Nodes are numbered in the
order of their lowest rank, and each node's ranks must be one consecutive
range (block placement, the default of Slurm and MPICH), since the run conf
records them as ``[lo, hi)``.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from .errors import ConfigError

#: The environment variable that makes consecutive groups of ranks count as nodes.
RANKS_PER_NODE = "MPIBURST_RANKS_PER_NODE"


def ranks_per_node() -> int | None:
    """Return ``$MPIBURST_RANKS_PER_NODE`` as a positive number, or None when unset.

    Raises
    ------
    ConfigError
        If it is set but not a whole number of at least 1.
    """
    text = os.environ.get(RANKS_PER_NODE, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{RANKS_PER_NODE}={text!r} is not a whole number of at least 1; set the number of ranks "
                          f"per node, or unset it to group ranks by the node they run on.")
    return value


def layout(comm: Any) -> tuple[int, list[tuple[int, int]]]:
    """Return this rank's node index and every node's half-open rank range (collective over ``comm``).

    Every rank gets the same ranges, or the same :class:`ConfigError` (a
    node whose ranks are not consecutive).
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    per = ranks_per_node()
    if per is not None:
        ranges = [(lo, min(lo + per, size)) for lo in range(0, size, per)]
        return rank // per, ranges
    from mpi4py import MPI

    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        first, count = shared.allreduce(rank, op=MPI.MIN), shared.Get_size()
    finally:
        shared.Free()
    groups = comm.allgather((first, count))
    placement = [f for f, _ in groups]
    nodes = sorted(set(groups))
    if any(placement[r] != f for f, n in nodes for r in range(f, min(f + n, size))) or sum(n for _, n in nodes) != size:
        raise ConfigError(f"the ranks of a node are not consecutive (first rank of each rank's node: {placement}); "
                          f"place ranks in blocks (e.g. srun --distribution=block) or set {RANKS_PER_NODE}.")
    ranges = [(f, f + n) for f, n in nodes]
    return next(k for k, (lo, hi) in enumerate(ranges) if lo <= rank < hi), ranges


def app_ranges(channels: int, nodes: int, per_node: int | None) -> list[tuple[int, int]]:
    """Return each node's half-open range of the application's ranks: blocks of ``per_node`` (default: even)."""
    per = per_node or -(-channels // nodes)
    return [(min(k * per, channels), min((k + 1) * per, channels)) for k in range(nodes)]


#: Environment variables holding a process's MPI world rank, set by the launchers (Open MPI, MPICH/PMI, PMIx, Slurm).
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def world_rank() -> int | None:
    """Return this process's MPI world rank: from mpi4py when MPI is initialised, else the launcher's environment."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return int(mpi.COMM_WORLD.Get_rank())
    for var in RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def node_of_process(entries: list[dict[str, Any]]) -> int | None:
    """Return the node of a multi-node run this process belongs to, or None (a process on none of them).

    A process that joins a run it did not start (``Tier.connect``: a rank of
    a job whose tier ``mpiburst run`` or a prolog started) is on the node
    whose server runs on this host; when several do (simulated nodes), the
    one whose rank range holds this process's world rank.
    """
    here = socket.gethostname()
    local = [k for k, e in enumerate(entries) if e.get("hostname") == here]
    if len(local) == 1:
        return local[0]
    rank = world_rank()
    if rank is not None:
        for k in local:
            lo, hi = entries[k]["ranks"]
            if lo <= rank < hi:
                return k
    return local[0] if local else None
