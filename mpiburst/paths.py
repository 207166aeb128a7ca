"""``burst://`` paths: map them to BFS paths and keep them inside the run's BFS root.

IME's rule for ``ime://``: ``burst://dir/file`` is relative to the BFS root,
``burst:///abs/dir/file`` is absolute. Either must resolve (after ``..`` and
symlinks) inside the BFS root, so a job cannot write through the tier to a
place the run was not given.
"""

from __future__ import annotations

import os

from .errors import PathError

SCHEME = "burst://"


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
    text = os.fspath(path)
    root = os.path.realpath(bfs_root)
    rest = text[len(SCHEME):] if is_burst(text) else text
    if not rest.strip("/"):
        raise PathError(f"{text!r} names no file; write burst://dir/file (relative to the BFS root {root}).")
    target = (rest if rest.startswith("/") else os.path.join(root, rest)) if is_burst(text) else os.path.abspath(text)
    real = os.path.realpath(target)
    if real != root and os.path.commonpath([real, root]) != root:
        raise PathError(f"{text!r} resolves to {real}, outside the run's BFS root {root}; "
                        "use a path inside the root or start the run with another --bfs-root.")
    return real
