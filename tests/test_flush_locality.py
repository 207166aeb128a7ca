"""Flush locality's plan (#15): which rank writes which stripes, from where each node's bytes lie.

Pure functions of :mod:`mpiburst.flush`, checked on random layouts; the
flush itself on a real 3-server cluster with real ranks is in
``tests/test_flush_locality_cluster_mpi.py``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mpiburst import flush
from mpiburst.overlay import Extent, Strided

ALIGN = 1 << 16


def _plan(size: int, new: bool = True, clean: int = 0, upto: int = 1 << 30) -> flush.snapshot.Plan:
    return flush.snapshot.Plan(target="/x", work="/.x", token="t", upto=upto, clean=clean, size=size, trunc=None,
                       align=ALIGN, base=0, new=new, umask=0o022)


@st.composite
def layouts(draw):
    """A file of some stripes, some ranks on some nodes, random holdings per node."""
    nstripes = draw(st.integers(1, 40))
    nodes = draw(st.integers(2, 4))
    where = sorted(draw(st.lists(st.integers(0, nodes - 1), min_size=2, max_size=8)))
    held = {}
    for k in range(nodes):
        counts = draw(st.dictionaries(st.integers(0, nstripes + 2), st.integers(1, ALIGN), max_size=nstripes))
        dirty = {d for d in counts if draw(st.booleans())}
        held[k] = (counts, dirty)
    return nstripes, where, held


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_every_stripe_is_written_by_exactly_one_rank_and_dirty_ones_by_their_main_holder(layout):
    nstripes, where, held = layout
    plan = _plan(nstripes * ALIGN - 7)
    shares = [flush.locality.assign(plan, 1, where, held, r) for r in range(len(where))]
    written = sorted(s for ranges in shares for a, b in ranges for s in range(a, b))
    assert written == list(range(nstripes))                    # a partition of the file's stripes
    for ranges in shares:
        assert all(a < b for a, b in ranges) and ranges == sorted(ranges)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:]))  # merged: no two runs touch
    present = set(where)
    for r, ranges in enumerate(shares):
        for a, b in ranges:
            for d in range(a, b):
                if not any(d in dirty for _, dirty in held.values()):
                    continue
                best = max(held[k][0].get(d, 0) for k in present)
                if best > 0:   # a dirty stripe some node here holds bytes of: a rank of a node holding most
                    assert held[where[r]][0].get(d, 0) == best, (d, r, where[r])


def test_a_node_s_domains_are_dealt_to_its_ranks_in_contiguous_runs():
    plan = _plan(12 * ALIGN)
    where = [0, 0, 1, 1]
    # node 0 holds stripes 0-5, node 1 holds 6-11, all dirty
    held = {0: ({d: ALIGN for d in range(6)}, set(range(6))), 1: ({d: ALIGN for d in range(6, 12)}, set(range(6, 12)))}
    assert [flush.locality.assign(plan, 1, where, held, r) for r in range(4)] == [[(0, 3)], [(3, 6)], [(6, 9)], [(9, 12)]]
    # interleaved: node 0 the even stripes, node 1 the odd ones; then ranks get every other stripe of their node
    held = {0: ({d: ALIGN for d in range(0, 12, 2)}, set(range(0, 12, 2))),
            1: ({d: ALIGN for d in range(1, 12, 2)}, set(range(1, 12, 2)))}
    shares = [flush.locality.assign(plan, 1, where, held, r) for r in range(4)]
    assert shares == [[(0, 1), (2, 3), (4, 5)], [(6, 7), (8, 9), (10, 11)],
                      [(1, 2), (3, 4), (5, 6)], [(7, 8), (9, 10), (11, 12)]]


def test_clean_stripes_and_holes_keep_the_contiguous_shares():
    plan = _plan(8 * ALIGN, new=False)
    where = [0, 1]
    held = {1: ({0: ALIGN, 1: ALIGN}, {0})}     # stripe 1 only clean on node 1: the BFS copy is its bytes
    assert flush.locality.assign(plan, 1, where, held, 0) == [(1, 4)]
    assert flush.locality.assign(plan, 1, where, held, 1) == [(0, 1), (4, 8)]


def test_holdings_count_the_snapshot_bytes_per_domain_and_mark_the_dirty_ones():
    plan = _plan(10 * ALIGN, new=False, clean=5, upto=20)
    entries = [Extent(3, 0, 2 * ALIGN, 0, 0),               # clean: counted, not dirty
               Extent(7, ALIGN + 10, ALIGN, 1, 0),          # dirty, across stripes 1 and 2
               Extent(30, 4 * ALIGN, 100, 2, 0),            # after the snapshot: ignored
               Strided(9, 5 * ALIGN + ALIGN - 10, 20, 3, 0, 3, ALIGN)]   # blocks cross into the next stripe
    counts, dirty = flush.locality.holdings(entries, plan, 1)
    assert counts == {0: ALIGN, 1: 2 * ALIGN - 10, 2: 10, 5: 20, 6: 20, 7: 20}
    assert dirty == {1, 2, 5, 6, 7, 8}
    assert flush.locality.domain_stripes(_plan((flush.locality.MAX_DOMAINS * 3 + 1) * ALIGN)) == 4
