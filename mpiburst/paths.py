"""``burst://`` paths: map them to BFS paths and keep them inside the run's BFS root.

IME's rule for ``ime://``: ``burst://dir/file`` is relative to the BFS root,
``burst:///abs/dir/file`` is absolute. Either must resolve (after ``..`` and
symlinks) inside the BFS root, so a job cannot write through the tier to a
place the run was not given.
"""

from __future__ import annotations

import functools
import os
import stat
import time

from .errors import PathError

SCHEME = "burst://"
#: Seconds a directory found missing is taken as still missing by this process's opens that create a file
#: without looking it up (``look`` False): a network filesystem caches no missing name, so each such lookup is
#: a round trip to its servers (0.2-0.5 ms on this machine's GlusterFS), paid by every new file of a directory
#: the tier holds but the BFS does not have yet (#25). As long as a kernel's entry cache keeps a name (1 s is
#: FUSE's and GlusterFS's default).
MISSING_TTL = 1.0
#: Directories found missing: path -> when (``time.monotonic``); at most :data:`_MISSING_MAX` of them.
_missing: dict[str, float] = {}
_MISSING_MAX = 256


def is_burst(path: str | os.PathLike) -> bool:
    """Return True if ``path`` is a ``burst://`` URL (served by the tier)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def resolve(path: str | os.PathLike, bfs_root: str) -> str:
    """Return the absolute, symlink-free BFS path that ``path`` names.

    Parameters
    ----------
    path
        ``burst://rel/file``, ``burst:///abs/file``, or a plain path (taken
        relative to the current directory), which must also lie in the root.
    bfs_root
        The run's BFS root.

    Raises
    ------
    PathError
        If the path is empty or resolves outside ``bfs_root``.
    """
    return _resolved(path, bfs_root)[0]


def locate(path: str | os.PathLike, bfs_root: str, look: bool = True) -> tuple[str, os.stat_result | None]:
    """Return :func:`resolve`'s path and what the BFS holds there (its ``stat``, None if nothing).

    One lookup of the BFS file serves both: opening a new file looks its
    path up once, not twice (each lookup is a round trip on a network
    filesystem). ``look`` False: only the file's directories are looked up,
    not the file (its ``stat`` is None: unknown, see :mod:`mpiburst.lookup`),
    and a symbolic link as its last component is not resolved. Raises as
    :func:`resolve`.
    """
    real, below = _resolved(path, bfs_root, look)
    if not look:
        return real, None
    return real, below[1] if below else bfs_stat(real)


def _resolved(path: str | os.PathLike, bfs_root: str,
              look: bool = True) -> tuple[str, tuple[str, os.stat_result | None] | None]:
    """Return :func:`resolve`'s path and, when it came from :func:`_below`, that function's answer.

    ``look`` False: :func:`_below` does not look the last component up.
    """
    text = os.fspath(path)
    root = _real_root(bfs_root)
    rest = text[len(SCHEME):] if is_burst(text) else text
    if not rest.strip("/"):
        raise PathError(f"{text!r} names no file; write burst://dir/file (relative to the BFS root {root}).")
    relative = is_burst(text) and not rest.startswith("/")
    below = _below(root, rest, look) if relative else None
    if below is not None:
        real = below[0]
    else:
        real = os.path.realpath(os.path.join(root, rest) if relative else rest if is_burst(text) else
                                os.path.abspath(text))
    # what _below found is the root joined with names free of ".." and symlinks: inside it by construction
    if below is None and real != root and os.path.commonpath([real, root]) != root:
        raise PathError(f"{text!r} resolves to {real}, outside the run's BFS root {root}; "
                        "use a path inside the root or start the run with another --bfs-root.")
    return real, below


def bfs_stat(path: str) -> os.stat_result | None:
    """Return the ``stat`` of the BFS file at ``path``, or None if there is none."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


@functools.lru_cache(maxsize=16)
def _real_root(bfs_root: str) -> str:
    """Return the run's BFS root without symlinks, resolved once per process (a root is fixed for its run)."""
    return os.path.realpath(bfs_root)


def _below(root: str, rest: str, look: bool = True) -> tuple[str, os.stat_result | None] | None:
    """Return ``os.path.realpath(root/rest)`` for a ``root`` already free of symlinks, and the file's ``lstat``.

    ``realpath`` looks up every component from ``/``: a dozen ``lstat`` calls
    per open on a deep root, each a round trip on a network filesystem. The
    components below the root are looked up here one by one until one does
    not exist (nothing below it can: the file's ``stat`` is then None).
    Returns None for a symlink or ``..`` among them: :func:`locate` leaves
    those to ``realpath``. ``look`` False: the last component is not looked
    up (its ``lstat`` is returned as None), and a directory this process
    found missing less than :data:`MISSING_TTL` seconds ago is not looked
    up again.
    """
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    cur = root
    found: os.stat_result | None = None
    last = len(parts) - 1
    for i, part in enumerate(parts):
        cur = os.path.join(cur, part)
        if not look:
            if i == last:
                return cur, None
            seen = _missing.get(cur)
            if seen is not None and time.monotonic() - seen < MISSING_TTL:
                return os.path.join(cur, *parts[i + 1:]), None
        try:
            found = os.lstat(cur)
        except FileNotFoundError:
            if i < last:
                if len(_missing) >= _MISSING_MAX:
                    _missing.clear()
                _missing[cur] = time.monotonic()
            return os.path.join(cur, *parts[i + 1:]), None
        except OSError:
            return None
        if _missing:
            _missing.pop(cur, None)   # there now
        if stat.S_ISLNK(found.st_mode):
            return None
    return cur, found
