"""A commit's journal: the renames it is about to make, so that a commit killed while renaming is completed.

A commit writes every file's new version aside (the files of a new
directory: in a staging directory, :mod:`~mpiburst.flush.newdirs`), then lists the renames in
``.mpiburst-commit-<token>.json`` in the BFS root (fsync'd) before it makes
them. :func:`recover`, run by every sync and commit before it starts, makes
the renames of a journal whose commit died (a staging directory's with
:func:`~mpiburst.flush.newdirs.publish`), so either all of a commit's files
are published or none. A journal that a killed commit was still writing
(``.json.tmp``) never became its commit point: recover removes it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import time
from collections.abc import Iterable

from ..errors import FlushError
from . import newdirs
from .snapshot import BfsLock, Plan
from .writes import fsync_dir

_JOURNAL = ".mpiburst-commit-{}.json"

#: Seconds after which an unreadable journal being written (``.json.tmp``) is taken as its
#: commit's, killed: writing one takes one write call, far less than this.
UNFINISHED_AGE = 60.0


def write_journal(bfs_root: str, plans: list[Plan], stages: Iterable[tuple[str, str]] = ()) -> str:
    """Write and fsync the list of renames a commit is about to make; return its path.

    ``stages``: the commit's staging directories and their final names
    (:mod:`~mpiburst.flush.newdirs`), renamed as a whole; their files are not listed.
    """
    path = os.path.join(bfs_root, _JOURNAL.format(secrets.token_hex(8)))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        renames = [[p.work, p.target] for p in plans if not p.in_place and not p.staged]   # in place: written already
        renames += [[root, top] for root, top in stages]
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
    pattern = os.path.join(glob.escape(bfs_root), _JOURNAL.format("*"))
    for unfinished in glob.glob(pattern + ".tmp"):
        _drop_unfinished(bfs_root, unfinished)
    done = 0
    for journal in glob.glob(pattern):
        renames = _read(bfs_root, journal)
        if renames is None:
            continue                      # unreadable, or not one of ours: leave it alone
        locks = _lock_all(renames)
        if locks is None:
            continue                      # its commit is still running
        try:
            for work, target in renames:
                if os.path.isdir(work) and not os.path.islink(work):   # a new directory, staged
                    newdirs.publish(work, target)
                    continue
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


def _drop_unfinished(bfs_root: str, path: str) -> None:
    """Remove a journal a killed commit was writing: it never became the commit point, so nothing of it is published.

    A readable one whose directories are unlocked is its dead commit's; an
    unreadable one (killed mid-write) once it is older than :data:`UNFINISHED_AGE`.
    """
    renames = _read(bfs_root, path)
    if renames is None:
        with contextlib.suppress(OSError):
            if time.time() - os.stat(path).st_mtime > UNFINISHED_AGE:
                os.unlink(path)
        return
    locks = _lock_all(renames)
    if locks is None:
        return                            # its commit is still running
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        for lock in locks:
            lock.release()


def _read(bfs_root: str, path: str) -> list[tuple[str, str]] | None:
    """The renames ``path`` lists, or None if it is unreadable or names a file that is not a flush's."""
    try:
        with open(path, "rb") as f:
            renames = [(str(w), str(t)) for w, t in json.load(f)["renames"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return renames if all(_journal_entry_ok(bfs_root, w, t) for w, t in renames) else None


def _lock_all(renames: list[tuple[str, str]]) -> list[BfsLock] | None:
    """Lock each directory the renames touch, without waiting; None (nothing held) if a commit holds one."""
    locks: list[BfsLock] = []
    try:
        for directory in sorted({os.path.dirname(t) for _, t in renames}):   # one lock per directory
            locks.append(BfsLock.take(directory, wait=0))
    except (FlushError, OSError):
        for lock in locks:
            lock.release()
        return None
    return locks


def _journal_entry_ok(bfs_root: str, work: str, target: str) -> bool:
    """True if ``work`` is a flush's new version of ``target``, beside it, inside ``bfs_root``."""
    root = os.path.join(os.path.realpath(bfs_root), "")
    directory, name = os.path.split(target)
    return (target.startswith(root) and os.path.dirname(work) == directory
            and os.path.basename(work).startswith(f".{name}.mpiburst-"))
