"""A file opened without looking at the BFS: its BFS copy's size joined to its record when first needed.

Opening a new file through the tier used to look its path up on the BFS
first: the BFS file's size is the file's starting size. On a network
filesystem that lookup is a round trip of its own (a missing name is not
cached: about 0.2 ms on this machine's GlusterFS, a tenth of a direct
create), paid by every file of a file-per-process checkpoint although almost
none exists yet. ``mpiburst.File.Open`` with ``MODE_CREATE`` (without
``MODE_EXCL`` or ``MODE_APPEND``) therefore makes the record *unlooked*
(:attr:`~mpiburst.store.FileMeta.unlooked`) and leaves the lookup to whoever
first needs the starting size: the file's size and reads past what the tier
holds (:mod:`mpiburst.writeback`), ``Set_size``, the residency commands, and
the flush, which lists each directory anyway and so learns it for free
(:func:`mpiburst.flush.snapshot.prepare`). :func:`looked` makes that lookup
and records what it found, once, for every process
(:meth:`~mpiburst.store.Store.found_on_bfs`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace

from .errors import PathError
from .store import FileMeta, Store


def looked(store: Store, meta: FileMeta) -> FileMeta:
    """Return ``meta`` with its BFS file's size joined (itself if it is not unlooked).

    The BFS path is looked up without following a symbolic link: a link
    there was not resolved when the file was opened (only its directories
    were), and following it now could leave the BFS root.

    Raises
    ------
    PathError
        If the BFS holds a symbolic link at the file's path.
    """
    if not meta.unlooked:
        return meta
    try:
        found: os.stat_result | None = os.lstat(meta.path)
    except (FileNotFoundError, NotADirectoryError):
        found = None
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise PathError(f"{meta.path} on the BFS is a symbolic link, which a file opened with MODE_CREATE does "
                        "not follow; open the link's target path instead.")
    size = found.st_size if found is not None else None
    joined = store.found_on_bfs(meta.path, size)
    if joined is not None:
        return joined
    # the record is gone meanwhile (removed, or purged whole): what was found is what there is
    return replace(meta, unlooked=False, bfs=size is not None, size=max(meta.size, size or 0))
