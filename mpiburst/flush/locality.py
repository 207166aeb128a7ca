"""Which flusher writes which stripes: contiguous shares, a drain's chunks, and locality on several nodes.

Every rank of a collective flush derives the same assignment, so each stripe
is written by exactly one rank. One node: contiguous shares
(:func:`stripe_range`), or a drain's chunks dealt as the drain dealt them.
When the ranks span several nodes of a store with a placement
(:mod:`mpiburst.store.cluster_store`), each stripe holding dirty data goes to
a rank of the node whose server holds most of its bytes (:func:`share_out`),
so each rank reads mostly from its own node's server.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..overlay import Entry, Strided
from ..store import Store
from .failures import cause
from .snapshot import Plan


def stripe_range(plan: Plan, rank: int, nprocs: int) -> tuple[int, int]:
    """Return the stripes ``[first, last)`` flusher ``rank`` of ``nprocs`` writes."""
    nstripes = -(-plan.size // plan.align)
    return rank * nstripes // nprocs, (rank + 1) * nstripes // nprocs


def _my_stripes(plan: Plan, rank: int, nprocs: int) -> list[tuple[int, int]]:
    """Return the stripe ranges flusher ``rank`` of ``nprocs`` writes.

    A contiguous share (:func:`stripe_range`), except into a drain's claimed
    data file: there the drain's chunks are dealt out as the drain dealt
    them (chunk ``c`` to rank ``c % nprocs``), so what the drain left undone
    is shared evenly.
    """
    if plan.claimed is None or nprocs == 1:
        return [stripe_range(plan, rank, nprocs)]
    per = plan.claimed.chunk // plan.align
    nstripes = -(-plan.size // plan.align)
    return [(c * per, min(nstripes, (c + 1) * per)) for c in range(rank, -(-nstripes // per), nprocs)]


#: Environment variable: ``0`` turns flush locality off (each rank then writes a contiguous share of the stripes).
LOCALITY_ENV = "MPIBURST_FLUSH_LOCALITY"
#: At most this many domains per file when planning locality: a larger file's domains are several stripes.
MAX_DOMAINS = 1 << 16


def share_out(store: Store, plan: Plan, comm: Any) -> tuple[list[tuple[int, int]], str | None]:
    """Return the stripe ranges this rank writes, or the error every rank gets instead (collective).

    On one node, in a serial flush, into a drain's data file, or with
    ``$MPIBURST_FLUSH_LOCALITY=0``: :func:`_my_stripes`. When the flushing
    ranks span several nodes of a store with a :attr:`~mpiburst.store.Store.placement`,
    the stripes are cut into domains (one stripe each, or a few for a file
    of more than :data:`MAX_DOMAINS` stripes); each node's first rank lists
    the index of its own server (the first rank of the communicator lists
    those of nodes with no rank in it) and counts, per domain, the bytes of
    the snapshot held there; every rank then derives the same assignment
    (:func:`assign`): a domain holding dirty data is written by a rank of
    the node holding most of its bytes, the rest (holes, bytes already on
    the BFS) by the usual contiguous shares. Which rank writes a stripe never
    changes its bytes: each is assembled from every node that holds part of
    it, in sequence order, so overlapping writes of different nodes still
    resolve in arrival order.
    """
    rank, nprocs = comm.Get_rank(), comm.Get_size()
    default = _my_stripes(plan, rank, nprocs)
    if nprocs == 1 or plan.claimed is not None:
        return default, None
    placement = store.placement if os.environ.get(LOCALITY_ENV, "1") != "0" else None
    where: list[int | None] = comm.allgather(placement.local if placement is not None else None)
    if placement is None or None in where or len(set(where)) < 2:   # then every rank has None in ``where``
        return default, None
    per = domain_stripes(plan)
    leaders = {node: where.index(node) for node in set(where)}   # the first rank of each node
    error: str | None = None
    held: dict[int, tuple[dict[int, int], set[int]]] = {}
    try:
        for node in placement.holders(plan.target):
            if leaders.get(node, 0) == rank:
                held[node] = holdings(placement.node_index(plan.target, node), plan, per)
    except Exception as exc:  # noqa: BLE001 - every rank raises the same error below
        error = cause(exc)
    parts = comm.allgather((error, held))
    errors = [e for e, _ in parts if e]
    if errors:
        return [], errors[0]
    every: dict[int, tuple[dict[int, int], set[int]]] = {}
    for _, h in parts:
        every.update(h)
    return assign(plan, per, [w for w in where if w is not None], every, rank), None


def domain_stripes(plan: Plan) -> int:
    """Return the stripes per locality domain of ``plan``'s file: 1, or more to keep at most :data:`MAX_DOMAINS`."""
    nstripes = -(-plan.size // plan.align)
    return max(1, -(-nstripes // MAX_DOMAINS))


def holdings(entries: Iterable[Entry], plan: Plan, per: int) -> tuple[dict[int, int], set[int]]:
    """Count one node's bytes of the snapshot per domain of ``per`` stripes; return them and the dirty domains.

    A domain is dirty when an entry of the snapshot in it is newer than the
    clean watermark (any entry, for a new file): only those are written,
    the rest is the BFS file's bytes. A strided run's block counts in the
    domain it starts in (the figure only chooses a writer), but marks each
    domain it touches dirty.
    """
    span = per * plan.align
    counts: Counter[int] = Counter()
    dirty: set[int] = set()
    for e in entries:
        if e.seq > plan.upto or e.start >= plan.size:
            continue
        fresh = plan.new or e.seq > plan.clean
        if isinstance(e, Strided):
            starts = e.start + np.arange(e.nblocks, dtype=np.int64) * e.stride
            starts = starts[starts < plan.size]
            doms, n = np.unique(starts // span, return_counts=True)
            for d, c in zip(doms.tolist(), n.tolist()):
                counts[d] += c * e.length
            if fresh:
                dirty.update(doms.tolist())
                dirty.update(np.unique((np.minimum(starts + e.length, plan.size) - 1) // span).tolist())
            continue
        end = min(e.end, plan.size)
        for d in range(e.start // span, (end - 1) // span + 1):
            counts[d] += min(end, (d + 1) * span) - max(e.start, d * span)
            if fresh:
                dirty.add(d)
    return dict(counts), dirty


def assign(plan: Plan, per: int, where: list[int], held: dict[int, tuple[dict[int, int], set[int]]],
            rank: int) -> list[tuple[int, int]]:
    """Return the stripe ranges rank ``rank`` writes, from every node's holdings (the same on every rank).

    ``where[r]`` is rank ``r``'s node; ``held[k]`` node ``k``'s bytes per
    domain and dirty domains (:func:`holdings`). A dirty domain goes to the
    node with a rank here that holds most of its bytes (ties rotate with the
    domain, so an evenly mixed file is shared by every node); a node's
    domains are dealt to its ranks in contiguous runs, in order. Every other
    stripe goes to the rank whose contiguous share (:func:`stripe_range`)
    it lies in. So each stripe is written by exactly one rank.
    """
    nstripes = -(-plan.size // plan.align)
    ranks: dict[int, list[int]] = {}
    for r, node in enumerate(where):
        ranks.setdefault(node, []).append(r)
    order = sorted(ranks)
    owned: dict[int, list[int]] = {node: [] for node in order}
    for d in sorted(set().union(*(dirty for _, dirty in held.values()))):
        if d * per >= nstripes:
            continue
        best = max(order, key=lambda k: (held[k][0].get(d, 0) if k in held else 0, -((k - d) % len(order))))
        if best in held and held[best][0].get(d, 0) > 0:
            owned[best].append(d)
    mine: list[tuple[int, int]] = []
    node = where[rank]
    domains, peers = owned[node], ranks[node]
    i, m = peers.index(rank), len(peers)
    for d in domains[i * len(domains) // m:(i + 1) * len(domains) // m]:
        mine.append((d * per, min(nstripes, (d + 1) * per)))
    first, last = stripe_range(plan, rank, len(where))
    taken = sorted(d for ds in owned.values() for d in ds)
    pos = first
    for d in taken:                     # my contiguous share, minus the domains a node took
        a, b = d * per, min(nstripes, (d + 1) * per)
        if b <= pos:
            continue
        if a >= last:
            break
        if a > pos:
            mine.append((pos, a))
        pos = b
    if pos < last:
        mine.append((pos, last))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(mine):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
