"""Which states of a file reach its final name on the BFS (issue #29 item 1; docs/consistency.md).

Only states the application made consistent are published by the automatic
syncs (the engine's, a writer making room, a commit on SIGUSR1, a stage-out
after a failure): a file no handle has open for writing, or the state of a
file being written at its settled mark (when its writer opened it, or at the
``Sync`` of its only writer). Unit tests on the memory tier: what is tested
is the rule (``FileMeta.settled_state``, ``flush.commit(settled=True)``,
``residency.auto_sync`` / ``make_room``), not a server; the store contract
suite checks the counting on every store, ``tests/test_fault_loop.py`` the
whole under real faults.
"""

from __future__ import annotations

import os

import pytest

import mpiburst
from mpiburst import flush, residency
from mpiburst.tier import Tier


def _open(tier: Tier, name: str, data: bytes, mode: str = "wb"):
    f = mpiburst.open(f"burst://{name}", mode, tier=tier)
    f.write(data)
    f.flush()                       # in the tier, as a full write-back buffer would push it
    return f


def _bfs(tier: Tier, name: str) -> bytes | None:
    path = os.path.join(tier.bfs_root, name)
    return open(path, "rb").read() if os.path.exists(path) else None


def test_the_engines_sync_never_publishes_a_file_still_open_for_writing(mem_tier: Tier) -> None:
    """Before the fix the automatic sync published the half-written file under its final name."""
    f = _open(mem_tier, "ck.dat", b"H" * 5000)
    assert residency.auto_sync(mem_tier) == 0
    assert _bfs(mem_tier, "ck.dat") is None
    f.write(b"T" * 5000)
    f.close()
    assert residency.auto_sync(mem_tier) == 1
    assert _bfs(mem_tier, "ck.dat") == b"H" * 5000 + b"T" * 5000


def test_a_file_reopened_for_writing_is_published_as_it_was_closed(mem_tier: Tier) -> None:
    """The state before a reopen is consistent: the engine publishes it, never the half rewrite after it."""
    _open(mem_tier, "ck.dat", b"1" * 8000).close()
    again = _open(mem_tier, "ck.dat", b"2" * 3000, "r+b")
    assert residency.auto_sync(mem_tier) == 1
    assert _bfs(mem_tier, "ck.dat") == b"1" * 8000
    assert mem_tier.store.meta(os.path.join(mem_tier.bfs_root, "ck.dat")).dirty   # the rewrite waits
    again.close()
    residency.auto_sync(mem_tier)
    assert _bfs(mem_tier, "ck.dat") == b"2" * 3000 + b"1" * 5000


def test_a_truncating_reopen_makes_the_automatic_commit_wait(mem_tier: Tier) -> None:
    """A closed state the tier lost to a truncation before the BFS had it: nothing is committed, not a cut without it.

    'a' closed, 'b' closed after it, then 'a' reopened with "wb": a commit of
    'b' alone would hold the later write without the earlier one.
    """
    _open(mem_tier, "a.dat", b"A" * 4000).close()
    _open(mem_tier, "b.dat", b"B" * 4000).close()
    a = _open(mem_tier, "a.dat", b"a" * 10)
    assert flush.commit(tier=mem_tier, settled=True) == []
    assert _bfs(mem_tier, "a.dat") is None and _bfs(mem_tier, "b.dat") is None
    a.close()
    assert len(flush.commit(tier=mem_tier, settled=True)) == 2
    assert _bfs(mem_tier, "a.dat") == b"a" * 10 and _bfs(mem_tier, "b.dat") == b"B" * 4000


def test_an_explicit_commit_or_sync_publishes_the_file_as_it_is(mem_tier: Tier) -> None:
    """The application asked: ``mpiburst.sync`` and ``flush.commit()`` publish the file being written."""
    f = _open(mem_tier, "log.dat", b"L" * 3000)
    mpiburst.sync("burst://log.dat", tier=mem_tier)
    assert _bfs(mem_tier, "log.dat") == b"L" * 3000
    f.write(b"M" * 10)
    f.flush()
    flush.commit(tier=mem_tier)
    assert _bfs(mem_tier, "log.dat") == b"L" * 3000 + b"M" * 10
    f.close()


def test_a_tier_full_of_an_open_file_still_makes_room(tmp_path) -> None:
    """The one exception: when only the open files' own data fills the tier, a writer publishes them as they are.

    Else a file larger than the tier could not be written at all; the next
    flush after its Close makes it whole (docs/reliability.md).
    """
    tier = Tier.memory(str(tmp_path), capacity=64 << 10, align=4096)
    data = os.urandom(200 << 10)
    with mpiburst.open("burst://big.dat", "wb", tier=tier, buffer=16 << 10) as f:
        f.write(data)
    residency.auto_sync(tier)
    assert _bfs(tier, "big.dat") == data


def test_the_engine_makes_no_sync_round_for_a_file_only_being_written(mem_tier: Tier, caplog) -> None:
    """A file being written is dirty but has nothing to publish: the engine logs no sync every round.

    Before, each round above the threshold logged "syncing 1 dirty files"
    and a sync event into the run's I/O log, for nothing.
    """
    import logging

    from mpiburst import engine

    mem_tier.conf.sync_threshold = 0.0          # every round is above it
    f = _open(mem_tier, "ck.dat", b"H" * 5000)
    eng = engine.Engine(mem_tier, logging.getLogger("test.engine"))
    with caplog.at_level(logging.INFO, logger="test.engine"):
        eng.thresholds()
        eng.thresholds()
    assert "syncing" not in caplog.text
    assert not [e for e in mem_tier.store.stats()[1] if e.get("kind") == "sync"]
    f.close()
    with caplog.at_level(logging.INFO, logger="test.engine"):
        eng.thresholds()
    assert "syncing 1 dirty files" in caplog.text and _bfs(mem_tier, "ck.dat") == b"H" * 5000



def test_a_writer_that_finds_the_tier_full_retries_before_publishing_an_open_file(tmp_path) -> None:
    """Another process freed the memory between this writer's failed write and its round of making room.

    That round finds nothing of its own to flush or free; before, it then
    published the file still being written, half-written, under its final
    name (a job killed next left it there: the fault loop's usr1-term trial,
    in CI; a soak of the loop met such rounds in about one trial in
    sixteen). Now the write is tried again first, and a later round
    publishes the open file as it stands only when its own data holds a
    good part of a tier nearly full, where nothing else could make room for it.
    """
    from mpiburst.errors import TierFullError
    from mpiburst.writeback import with_room

    tier = Tier.memory(str(tmp_path), capacity=64 << 10, align=4096)
    _open(tier, "closed.dat", b"C" * 6000).close()
    residency.auto_sync(tier)
    residency.auto_purge(tier)                        # what another writer's round did meanwhile
    f = _open(tier, "open.dat", b"H" * 5000)
    tries: list[int] = []

    def full_once() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise TierFullError("full (test)")
        return "written"

    def full() -> str:
        raise TierFullError("full (test)")

    assert with_room(tier, full_once, "write (test)") == "written" and len(tries) == 2
    assert _bfs(tier, "open.dat") is None             # not published half-written
    assert residency.make_room(tier, open_files=False) is False
    assert residency.make_room(tier) is False         # 5,000 bytes of 64 KiB: publishing it would free little
    with pytest.raises(TierFullError, match="capacity"):   # full of something else: fail, never publish
        with_room(tier, full, "write (test)")
    assert _bfs(tier, "open.dat") is None
    f.write(b"h" * (40 << 10))
    f.flush()                                         # now the open file's own data fills most of the tier
    assert residency.make_room(tier) is True          # the exception of the rule (a file larger than the tier)
    assert _bfs(tier, "open.dat") == b"H" * 5000 + b"h" * (40 << 10)
    f.close()
