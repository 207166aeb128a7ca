"""Data residency: which bytes of a file live in the tier, and moving them in and out.

IME's controls over a write-back tier, on mpiburst's data model
(:mod:`mpiburst.store`):

* :func:`purge` drops a file's data from the tier (``clean_only``: only what
  the BFS already holds); :func:`pin` / :func:`unpin` exempt a file from the
  automatic engine; :func:`prestage` copies BFS bytes into the tier as clean
  fragments (sequence number 0, so any write wins over them);
* :func:`frag_stat` counts a file's bytes per state; :func:`ls`, :func:`stat`,
  :func:`read` (``cat``) and :func:`rm` inspect and remove tier files;
* :func:`auto_sync`, :func:`auto_purge` and :func:`make_room` are the
  threshold actions shared by the engine (:mod:`mpiburst.engine`) and by the
  driver when the tier is full.

States of a fragment's bytes (:class:`FragStat`; disjoint, they add up to the
bytes the tier's index holds): *dirty* (``seq > max(clean, pending)``: only in
the tier), *pending* (``clean < seq <= pending``: a flush is writing them),
*clean* (``seq <= clean``: the BFS holds the same bytes), each counting only
bytes still visible, and *deletable*: bytes no read can see any more because
newer writes cover them (freed when their whole blob is dropped).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, overload

import numpy as np

from . import flush
from .assembly import BfsBytes, current_bytes
from .errors import FlushError, MpiburstError, PathError, ServerError
from .iostats import dirty_bytes
from .lookup import looked
from .overlay import Entry, Strided, bounds, gaps, visible
from .overlay import expand as blocks_of
from .paths import resolve
from .perms import create_aside, current_umask, give_final_attrs
from .store import MAX_EXTENT, FileMeta, RecordGone, Store
from .tier import Tier

#: Bytes of the BFS file read and committed per prestage batch.
PRESTAGE_CHUNK = 8 << 20


@dataclass
class FragStat:
    """Bytes of one file in the tier per residency state (see the module docstring)."""

    dirty: int = 0
    pending: int = 0
    clean: int = 0
    deletable: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counts as a plain dict (for JSON)."""
        return asdict(self)


def _tier(tier: Tier | None) -> Tier:
    """Return ``tier`` (default: the current one), the records of new files this process opened sent first."""
    tier = tier or Tier.current()
    tier.send_unsent()   # this process sees its files from their Open (mpiburst.File, "New files" in docs/api.md)
    return tier


def _locate(path: str | os.PathLike, tier: Tier | None) -> tuple[Tier, Store, str]:
    """Return the tier (default: the current one), its store and the BFS path ``path`` names."""
    tier = _tier(tier)
    return tier, tier.store, resolve(path, tier.bfs_root)


def _known(store: Store, target: str) -> FileMeta:
    """Return the record of ``target`` (its BFS size joined, :mod:`mpiburst.lookup`); PathError if there is none."""
    meta = store.meta(target)
    if meta is None:
        raise PathError(f"{target} is not in the tier; check the path (mpiburst ls lists the tier's files).")
    return looked(store, meta)


def _bfs_size(target: str) -> int | None:
    try:
        return os.stat(target).st_size
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- residency controls

def purge(path: str | os.PathLike, *, clean_only: bool = False, force: bool = False, tier: Tier | None = None) -> int:
    """Drop a file's data from the tier; return the bytes freed.

    Parameters
    ----------
    clean_only
        Drop only data the BFS holds (IME's ``-k``): dirty data stays.
    force
        Without ``clean_only``, also drop dirty data (it is lost).

    Raises
    ------
    MpiburstError
        If dirty data would be lost and ``force`` is not given.
    PathError
        If the tier does not hold the file.
    """
    tier, store, target = _locate(path, tier)
    meta = _known(store, target)
    if clean_only:
        return store.drop_clean(target)
    if meta.dirty and not force:
        raise MpiburstError(f"{target} holds data not yet on the BFS; sync it first, purge with -k to keep it, "
                            f"or purge with --force to lose it.")
    freed = sum(b.bytes for b in store.blobs(target))
    store.drop(target)
    return freed


def pin(path: str | os.PathLike, *, tier: Tier | None = None) -> None:
    """Exempt a file from automatic sync and purge (a file only on the BFS is registered first)."""
    _set_pinned(path, True, tier)


def unpin(path: str | os.PathLike, *, tier: Tier | None = None) -> None:
    """Make a file subject to automatic sync and purge again."""
    _set_pinned(path, False, tier)


def _set_pinned(path: str | os.PathLike, pinned: bool, tier: Tier | None) -> None:
    tier, store, target = _locate(path, tier)
    if store.meta(target) is None:
        size = _bfs_size(target)
        if size is None:
            raise PathError(f"{target} is neither in the tier nor on the BFS; check the path.")
        store.create(target, size)
    store.set_pinned(target, pinned)


@overload
def prestage(path: str | os.PathLike, *, keep: bool = False, block: Literal[True] = True, tier: Tier | None = None,
             progress: Callable[[int], None] | None = None) -> int: ...


@overload
def prestage(path: str | os.PathLike, *, keep: bool = False, block: bool, tier: Tier | None = None,
             progress: Callable[[int], None] | None = None) -> int | None: ...


def prestage(path: str | os.PathLike, *, keep: bool = False, block: bool = True, tier: Tier | None = None,
             progress: Callable[[int], None] | None = None) -> int | None:
    """Copy a BFS file's bytes into the tier as clean fragments; return the bytes staged.

    Bytes the tier holds newer data for are not copied (writes always win).
    Without ``keep``, clean data already in the tier is dropped and read
    afresh from the BFS; with ``keep`` (IME's ``-K``) it is kept and only
    the rest is copied.

    Parameters
    ----------
    block
        False: queue the request for the engine and return None.
    progress
        Called with the bytes of the BFS file done so far (staged or already
        newer in the tier), after each chunk.

    Raises
    ------
    PathError
        If the BFS file does not exist, or the file was removed from the
        tier while it was prestaged.
    TierFullError
        If the tier has no room (what was staged before stays, clean).
    """
    tier = _tier(tier)
    target = resolve(path, tier.bfs_root)
    if not os.path.isfile(target):
        raise PathError(f"{target} is not a file on the BFS; there is nothing to prestage.")
    if not block:
        flush.enqueue(tier, "prestage", target, keep=keep)
        return None
    store = tier.store
    size = os.path.getsize(target)
    meta = store.create(target, size)
    if not keep:
        store.drop_clean(target)
    limit = min(size, meta.size, meta.trunc if meta.trunc is not None else size)
    staged = 0
    with open(target, "rb", buffering=0) as f:
        for lo in range(0, limit, PRESTAGE_CHUNK):
            hi = min(limit, lo + PRESTAGE_CHUNK)
            holes = gaps(lo, hi, store.extents(target, lo, hi))
            payload = bytearray()
            extents = []
            for a, b in holes:
                for s in range(a, b, MAX_EXTENT):
                    n = min(MAX_EXTENT, b - s)
                    data = os.pread(f.fileno(), n, s)
                    if len(data) < n:  # the BFS file shrank meanwhile: stage what is there
                        n = len(data)
                    if n:
                        extents.append((s, len(payload), n))
                        payload += data[:n]
            if extents:
                _stage(store, target, payload, extents)
                staged += len(payload)
            if progress is not None:
                progress(hi)
    return staged


def _stage(store: Store, target: str, payload: bytearray, extents: list[tuple[int, int, int]]) -> None:
    """Store one chunk of BFS bytes as staged (clean) data; once more if the server had lost its script."""
    for _ in range(2):
        try:
            store.commit(target, 0, payload, extents, staged=True)
            return
        except RecordGone:
            if store.meta(target) is None:
                raise PathError(f"{target} was removed from the tier while it was prestaged; "
                                "prestage it again if it is still wanted.") from None
    raise ServerError(f"the tier's server refused to stage {target} twice; see the server log.")


# ----------------------------------------------------------------------------- inspection

def frag_stat(path: str | os.PathLike, *, tier: Tier | None = None) -> FragStat:
    """Return the bytes of a file in the tier per state: dirty, pending, clean, deletable.

    Raises
    ------
    PathError
        If the tier does not hold the file.
    """
    tier, store, target = _locate(path, tier)
    meta = _known(store, target)
    return _frag_stat(store, meta)


def _frag_stat(store: Store, meta: FileMeta) -> FragStat:
    entries = list(dict.fromkeys(store.walk(meta.path)))   # every index entry once, strided runs compact
    pending = meta.pending if meta.pending > meta.clean else 0
    if any(isinstance(e, Strided) for e in entries):
        fast = _unshadowed_stat(entries, meta.clean, pending)
        if fast is not None:
            return fast
    extents = blocks_of(entries)
    stat = FragStat()
    for e, seen in zip(extents, visible(extents)):
        stat.deletable += e.length - seen
        if e.seq <= meta.clean:
            stat.clean += seen
        elif e.seq <= pending:
            stat.pending += seen
        else:
            stat.dirty += seen
    return stat


def _unshadowed_stat(entries: list[Entry], clean: int, pending: int) -> FragStat | None:
    """Return the bytes per state when no fragment shadows another (computed with numpy); None if some do."""
    starts, ends = bounds(-1, 2**63 - 1, entries)    # the blocks of strided runs first, then plain extents
    seqs = np.concatenate([np.full(e.nblocks, e.seq, dtype=np.int64) for e in entries if isinstance(e, Strided)]
                          + [np.array([e.seq for e in entries if not isinstance(e, Strided)], dtype=np.int64)])
    order = np.argsort(starts, kind="stable")
    starts, ends, seqs = starts[order], ends[order], seqs[order]
    if len(starts) > 1 and (starts[1:] < np.maximum.accumulate(ends)[:-1]).any():
        return None
    lengths = ends - starts
    return FragStat(dirty=int(lengths[seqs > max(clean, pending)].sum()),
                    pending=int(lengths[(seqs > clean) & (seqs <= pending)].sum()),
                    clean=int(lengths[seqs <= clean].sum()), deletable=0)


def ls(path: str | os.PathLike | None = None, *, tier: Tier | None = None) -> list[FileMeta]:
    """Return the records of the tier's files, sorted by path: all, or those at or under ``path``.

    One read of every record (:meth:`Store.cut <mpiburst.store.Store.cut>`),
    not one round trip per file; ``pending`` is not part of it (0: see :func:`stat`).
    """
    tier = _tier(tier)
    records = tier.store.cut()
    paths = sorted(records)
    if path is not None:
        target = resolve(path, tier.bfs_root)
        paths = [p for p in paths if p == target or p.startswith(target.rstrip("/") + "/")]
    return [looked(tier.store, records[p]) for p in paths]


def listdir(path: str | os.PathLike, *, tier: Tier | None = None) -> list[str]:
    """Return the names in a directory of ``burst://`` paths, sorted: what the tier holds there and the BFS.

    Like ``os.listdir``: files and subdirectories directly in the directory,
    whether only in the tier (not yet flushed), only on the BFS, or both;
    the flush's own files beside its targets (new versions aside, locks,
    commit journals, drained chunks: names starting with ``.`` and holding
    ``.mpiburst``) are left out. One read of the tier's registry and one of
    the BFS directory.

    ``burst://`` alone lists the BFS root.

    Raises
    ------
    PathError
        If neither the tier nor the BFS has such a directory, or it names a file.
    """
    tier = _tier(tier)
    root = os.fspath(path).rstrip("/") == "burst:"   # burst:// itself: the BFS root
    target = os.path.realpath(tier.bfs_root) if root else resolve(path, tier.bfs_root)
    prefix = target.rstrip("/") + "/"
    names: set[str] = set()
    tier_file = False
    for p in tier.store.files():
        if p.startswith(prefix):
            names.add(p[len(prefix):].split("/", 1)[0])
        tier_file = tier_file or p == target
    on_bfs = os.path.isdir(target)
    if tier_file or (not on_bfs and os.path.lexists(target)):
        raise PathError(f"{path} is a file, not a directory; list its directory, or stat the file.")
    if on_bfs:
        names.update(n for n in os.listdir(target) if not (n.startswith(".") and ".mpiburst" in n))
    elif not names:
        raise PathError(f"{path} is no directory: neither the tier nor the BFS holds anything under it; "
                        "check the path.")
    return sorted(names)


def stat(path: str | os.PathLike, *, tier: Tier | None = None) -> dict[str, Any]:
    """Return what the tier knows of a file: its record, its bytes per state, the BFS file's size.

    Raises
    ------
    PathError
        If the tier does not hold the file.
    """
    tier, store, target = _locate(path, tier)
    meta = _known(store, target)
    info = asdict(meta)
    info.update(_frag_stat(store, meta).as_dict())
    info["dirty_file"] = meta.dirty
    info["bfs_size"] = _bfs_size(target)
    info["lease"] = store.leased(target)
    return info


def read(path: str | os.PathLike, *, tier: Tier | None = None, chunk: int | None = None) -> Iterator[bytes]:
    """Yield the current bytes of a tier file (newest writes over the BFS copy), ``chunk`` at a time.

    Raises
    ------
    PathError
        If the tier does not hold the file.
    """
    tier, store, target = _locate(path, tier)
    meta = _known(store, target)
    chunk = chunk or tier.align
    buf = memoryview(bytearray(chunk))
    with BfsBytes(target, limit=meta.trunc) as bfs:
        for lo in range(0, meta.size, chunk):
            hi = min(meta.size, lo + chunk)
            view = buf[:hi - lo]
            if not current_bytes(store, target, lo, view, bfs=bfs):
                raise MpiburstError(f"the tier's bytes of {target} in [{lo}, {hi}) were purged while they were "
                                    "read; run the command again.")
            yield bytes(view)


def copy_out(path: str | os.PathLike, dest: str, *, tier: Tier | None = None) -> int:
    """Write the current bytes of a tier file to the BFS path ``dest``, whole or not at all; return its size.

    The bytes (:func:`read`) go to a private file beside ``dest``, which gets
    the mode a direct write would give it, is fsync'd and renamed into place.
    Nothing is marked clean: the tier file stays as it is. Stage-out uses it
    to publish a file that was still being written beside its final name.

    Raises
    ------
    PathError
        If the tier does not hold the file.
    FlushError
        If writing ``dest`` fails (nothing is left at ``dest`` or beside it).
    """
    tier, store, target = _locate(path, tier)
    meta = _known(store, target)
    directory, name = os.path.split(dest)
    work = os.path.join(directory, f".{name}.mpiburst-copy-{os.getpid()}")
    umask = meta.umask if meta.umask is not None else current_umask()
    try:
        create_aside(work)
        fd = os.open(work, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            done = 0
            for block in read(target, tier=tier):
                view = memoryview(block)
                while view:
                    n = os.write(fd, view)
                    view, done = view[n:], done + n
            if give_final_attrs(fd, dest, umask):
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(work, dest)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        if os.path.lexists(work):
            os.unlink(work)
        raise FlushError(f"cannot write {dest} ({exc.strerror}); the data stays in the tier.") from None
    return done


def rm(path: str | os.PathLike, *, tier: Tier | None = None) -> None:
    """Remove a file: its data in the tier and its BFS file.

    Raises
    ------
    PathError
        If neither the tier nor the BFS has the file.
    MpiburstError
        If a flush of the file is running.
    """
    tier, store, target = _locate(path, tier)
    known = store.meta(target) is not None
    on_bfs = os.path.lexists(target)
    if not known and not on_bfs:
        raise PathError(f"{target} is neither in the tier nor on the BFS; check the path.")
    if on_bfs and os.path.isdir(target):
        raise PathError(f"{target} is a directory; rm removes files only.")
    if store.leased(target):
        raise MpiburstError(f"a flush of {target} is running; wait for it to end and try again.")
    if known:
        store.drop(target)
    if on_bfs:
        os.unlink(target)


def is_dir(path: str | os.PathLike, *, tier: Tier | None = None) -> bool:
    """True if ``path`` is a directory of the BFS, or the tier holds files under it."""
    tier = _tier(tier)
    target = resolve(path, tier.bfs_root)
    prefix = target.rstrip("/") + "/"
    return os.path.isdir(target) or any(p.startswith(prefix) for p in tier.store.files())


def rmtree(path: str | os.PathLike, *, tier: Tier | None = None) -> int:
    """Remove a directory: every tier file under it (its data) and the BFS directory with all it holds.

    What ``rm -r`` does, for the trees of file-per-process output; each file
    goes as :meth:`mpiburst.File.Delete` removes one. Nothing is removed if a
    flush of any file under it is running. Returns the number of tier files
    removed.

    Raises
    ------
    PathError
        If ``path`` is the BFS root, a file, or no directory of the tier or the BFS.
    MpiburstError
        If a flush of a file under it is running.
    """
    tier = _tier(tier)
    target = resolve(path, tier.bfs_root)
    if target == os.path.realpath(tier.bfs_root):
        raise PathError(f"{path} is the run's BFS root; remove the directories under it instead.")
    listdir(path, tier=tier)   # a directory of the tier or the BFS, not a file: raises otherwise
    prefix = target.rstrip("/") + "/"
    under = sorted(p for p in tier.store.files() if p.startswith(prefix))
    busy = [p for p in under if tier.store.leased(p)]
    if busy:
        raise MpiburstError(f"a flush of {busy[0]} is running; wait for it to end and remove {path} again.")
    for p in under:
        tier.store.drop(p)
    if os.path.isdir(target):
        shutil.rmtree(target)
    return len(under)


def expand(paths: Iterable[str | os.PathLike], *, recursive: bool, tier: Tier | None = None,
           source: str = "tier") -> list[str]:
    """Return the BFS paths of the files named by ``paths``, directories expanded with ``recursive``.

    Parameters
    ----------
    source
        ``"tier"``: a directory stands for the tier's files under it;
        ``"bfs"``: for the regular files under it on the BFS (prestage).

    Raises
    ------
    PathError
        If a directory is given without ``recursive``, or holds no file.
    """
    tier = _tier(tier)
    files = sorted(tier.store.files()) if source == "tier" else []
    out: list[str] = []
    for path in paths:
        target = resolve(path, tier.bfs_root)
        prefix = target.rstrip("/") + "/"
        if source == "tier":
            is_dir = target not in files and (os.path.isdir(target) or any(f.startswith(prefix) for f in files))
        else:
            is_dir = os.path.isdir(target)
        if not is_dir:
            out.append(target)
            continue
        if not recursive:
            raise PathError(f"{path} is a directory; add -r to act on the files under it.")
        if source == "tier":
            found = [f for f in files if f.startswith(prefix)]
        else:
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(target) for n in names
                           if os.path.isfile(os.path.join(d, n)))
        if not found:
            raise PathError(f"{path} holds no {'tier ' if source == 'tier' else ''}files.")
        out.extend(found)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- threshold actions

def dirty_files(tier: Tier, include_pinned: bool = False) -> list[FileMeta]:
    """Return the records of the tier's files holding data not on the BFS (unpinned unless asked).

    One read of every record (:meth:`Store.cut <mpiburst.store.Store.cut>`):
    the engine asks this every round, and a round trip per file would grow
    with the files the tier holds.
    """
    records = tier.store.cut()
    return [records[p] for p in sorted(records)
            if records[p].dirty and (include_pinned or not records[p].pinned)]


#: The share of the tier's used memory (at least half its limit) that the open files' own dirty data must
#: hold before a writer that finds the tier full publishes them as they are (:func:`make_room`): less, and
#: publishing them would free little of a tier full of something else. A third, since on a small tier the
#: server's own memory and the batches in flight take a good part (8 MiB tier, 1 MiB batches: 3.2 MB).
OPEN_SHARE = 1 / 3


def auto_sync(tier: Tier, log: Callable[[str], None] | None = None, settled: bool = True) -> int:
    """Commit every dirty unpinned file (one consistent cut, see :func:`mpiburst.flush.commit`).

    ``settled`` (the default: the engine's sync) publishes a file still open
    for writing only up to its last consistent state, never half-written
    (``flush.commit(settled=True)``); False publishes every file as it is.

    Returns
    -------
    int
        The number of files flushed; 0 when the commit failed (reported to
        ``log``; the data stays dirty for a later attempt).
    """
    try:
        return len(flush.commit(tier=tier, include_pinned=False, settled=settled))
    except (FlushError, PathError) as exc:
        if log:
            log(str(exc))
        return 0


def auto_purge(tier: Tier) -> int:
    """Drop the clean data of every unpinned file; return the bytes freed."""
    store = tier.store
    freed = 0
    for p in sorted(store.files()):
        meta = store.meta(p)
        if meta is not None and not meta.pinned:
            freed += store.drop_clean(p)
    return freed


def make_room(tier: Tier, open_files: bool = True) -> bool:
    """Free tier memory when the tier is full: sync the dirty unpinned files, then drop clean data.

    First only what the application made consistent (:func:`auto_sync`);
    when that neither flushes nor frees anything, and ``open_files``, the
    files still being written as they are, but only when their own data
    holds at least :data:`OPEN_SHARE` of the tier's used memory (a file
    larger than the tier, say): then nothing else could make room for their
    writes. When they hold less, the rest of the tier is held by what a
    retry may find freed (another process's flush, a server's buffers) or
    by nothing this process may touch (pinned files), and publishing them
    half-written would break a promise for little.

    Returns
    -------
    bool
        True if this call flushed or freed anything (the caller retries its
        write). False when it found nothing to do: either another process
        freed the memory first (a retry will tell) or nothing can be freed.
    """
    synced = auto_sync(tier)
    if auto_purge(tier) > 0 or synced > 0:
        return True
    if not open_files:
        return False
    writing = [m for m in tier.store.cut().values() if m.writers > 0 and m.dirty and not m.pinned]
    used, limit = tier.store.memory()
    if not writing or limit <= 0 or dirty_bytes(tier.store, writing) < OPEN_SHARE * max(used, limit // 2):
        return False
    # Nothing consistent was left to publish or free and the open files' own data fills the tier. Publish
    # them as they are rather than fail the write; the next flush after their Close makes them whole
    # (docs/reliability.md, "No half-written file", not promised).
    synced = auto_sync(tier, settled=False)
    return auto_purge(tier) > 0 or synced > 0


def wait_clean(path: str, *, tier: Tier | None = None, timeout: float = 30.0) -> bool:
    """Wait until the tier holds nothing dirty of ``path`` (a queued sync done); True if it happened."""
    tier, store, target = _locate(path, tier)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = store.meta(target)
        if meta is not None and not meta.dirty:
            return True
        time.sleep(0.05)
    return False
