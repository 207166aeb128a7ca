"""A commit's journal: the renames it is about to make, so that a commit killed while renaming is completed.

A commit writes every file's new version aside, then lists the renames in
``.mpiburst-commit-<token>.json`` in the BFS root (fsync'd) before it makes
them. :func:`recover`, run by every sync and commit before it starts, makes
the renames of a journal whose commit died, so either all of a commit's files
are published or none.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets

from ..errors import FlushError
from .snapshot import BfsLock, Plan
from .writes import fsync_dir

_JOURNAL = ".mpiburst-commit-{}.json"


def write_journal(bfs_root: str, plans: list[Plan]) -> str:
    """Write and fsync the list of renames a commit is about to make; return its path."""
    path = os.path.join(bfs_root, _JOURNAL.format(secrets.token_hex(8)))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        renames = [[p.work, p.target] for p in plans if not p.in_place]   # those are written already
        os.write(fd, json.dumps({"renames": renames}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(bfs_root)
    return path


def recover(bfs_root: str) -> int:
    """Finish the renames of commits killed while publishing; return how many journals were completed.

    A journal whose files are locked belongs to a commit still running and
    is left to it. Run by every sync and commit before it starts.
    """
    done = 0
    for journal in glob.glob(os.path.join(glob.escape(bfs_root), _JOURNAL.format("*"))):
        try:
            with open(journal, "rb") as f:
                renames = [(str(w), str(t)) for w, t in json.load(f)["renames"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not all(_journal_entry_ok(bfs_root, w, t) for w, t in renames):
            continue                      # not one of ours: leave it alone
        locks: list[BfsLock] = []
        try:
            for directory in sorted({os.path.dirname(t) for _, t in renames}):   # one lock per directory
                locks.append(BfsLock.take(directory, wait=0))
        except (FlushError, OSError):
            for lock in locks:
                lock.release()
            continue                      # its commit is still running
        try:
            for work, target in renames:
                with contextlib.suppress(FileNotFoundError):   # renamed before the commit was killed
                    os.rename(work, target)
            for directory in dict.fromkeys(os.path.dirname(t) for _, t in renames):
                fsync_dir(directory)
            os.unlink(journal)
            done += 1
        finally:
            for lock in locks:
                lock.release()
    return done


def _journal_entry_ok(bfs_root: str, work: str, target: str) -> bool:
    """True if ``work`` is a flush's new version of ``target``, beside it, inside ``bfs_root``."""
    root = os.path.join(os.path.realpath(bfs_root), "")
    directory, name = os.path.split(target)
    return (target.startswith(root) and os.path.dirname(work) == directory
            and os.path.basename(work).startswith(f".{name}.mpiburst-"))
