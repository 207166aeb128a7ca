"""BFS writes: the new version written aside, checked, sealed, renamed into place, the snapshot marked clean.

A flusher copies the kept bytes of its stripes from the old file into the new
version in the kernel (:func:`copy_data`), then writes its dirty runs
:data:`WRITE_SIZE` bytes at a time, while a helper thread assembles the next
batch (:func:`write_run`). Rank 0 then gives the new version its size and
attributes and fsyncs it (:func:`seal`), renames it over the final name and
fsyncs the directory (:func:`publish`), and marks the snapshot clean under
the lease (:func:`settle`); a failure undoes what it can (:func:`abort`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .. import drain
from ..buffers import borrowed
from ..errors import FlushError
from ..overlay import Entry
from ..perms import give_final_attrs
from ..store import FlushLease, Store
from . import snapshot
from .failures import LeaseLost, quiet
from .snapshot import Plan, release_lock
from .stripes import assemble_runs, batches, dirty_runs

#: Largest write call of a flush: adjacent dirty stripes are assembled into one
#: buffer of up to this many bytes (rounded down to whole stripes, at least one).
WRITE_SIZE = 8 << 20


#: Called as ``observer(path, offset, length)`` for every write call made on the BFS
#: (after it succeeded); tests and benchmarks use it to count and check writes.
write_observers: list[Callable[[str, int, int], None]] = []


class Tally:
    """Write calls and bytes of one flusher (thread-safe: workers share it)."""

    def __init__(self, progress: Callable[[int], None] | None = None, verify: bool = False) -> None:
        self.bytes = 0
        self.drained = 0
        self.sizes: Counter[int] = Counter()
        self.crcs: list[tuple[int, int, int]] = []   # (offset, length, crc32) of writes, to verify
        self._lock = threading.Lock()
        self._progress = progress
        self._verify = verify

    def add(self, offset: int, data: memoryview) -> None:
        crc = zlib.crc32(data) if self._verify else 0
        with self._lock:
            self.bytes += len(data)
            self.sizes[len(data)] += 1
            if self._verify:
                self.crcs.append((offset, len(data), crc))
            total = self.bytes
        if self._progress is not None:
            self._progress(total)


def write_run(store: Store, plan: Plan, ranges: list[tuple[int, int]], tally: Tally, workers: int,
              sync: bool = True, listed: Sequence[Entry] | None = None) -> None:
    """Copy the kept bytes of the stripe ``ranges``, write their dirty runs (in ``workers`` threads), fsync.

    ``sync`` False leaves the fsync to :func:`seal` (a commit writes all its
    files first, then fsyncs them all). ``listed``: the snapshot's index
    entries over the whole file (``seq <= plan.upto``), listed already (a
    commit lists those of all its small files at one go); used when the
    file is written whole in one batch.
    """
    ranges = [(first, last) for first, last in ranges if first < last]
    if not ranges:
        return
    # A small file written whole (a commit's, most often) in one batch: its index is listed once, for the
    # stripes to write and for their bytes (a walk, then a listing per batch, would be two round trips).
    whole = plan.claimed is None and plan.size <= WRITE_SIZE and ranges == [(0, -(-plan.size // plan.align))]
    if not whole:
        listed = None
    elif listed is None:
        listed = store.index(plan.target, 0, plan.size, upto=plan.upto)
    src = os.open(plan.target, os.O_RDONLY | os.O_NOFOLLOW) if plan.base else None
    fd = plan.fd if plan.fd is not None else os.open(plan.work, os.O_RDWR | os.O_NOFOLLOW)
    try:
        runs: list[tuple[int, int]] = []
        for first, last in ranges:
            if src is not None:
                copy_data(src, fd, first * plan.align, min(last * plan.align, plan.base))
            mine = list(dirty_runs(store, plan, first, last, listed))
            if plan.claimed is not None:
                fresh = drain.fresh_chunks(store, plan.target, plan.claimed, plan.upto, plan.size,
                                           first * plan.align, last * plan.align)
                mine = drain.runs_to_write(mine, plan.claimed, fresh, plan.align, first, last)
                tally.drained += sum(min(last * plan.align, plan.size, (c + 1) * plan.claimed.chunk)
                                     - max(first * plan.align, c * plan.claimed.chunk) for c in fresh)
            runs.extend(mine)
        total = sum(b - a for a, b in runs)
        if plan.fd is not None and plan.base == 0 and plan.claimed is None:   # a commit's new file: no stat to seal
            plan.end = max((min(plan.size, b * plan.align) for _, b in runs), default=0)
        if workers == 1 or total < 2:
            _write_stripes(store, plan, runs, src, fd, tally, listed)
        else:
            n = min(workers, total)
            parts = list(batches(runs, -(-total // n)))
            with ThreadPoolExecutor(len(parts)) as pool:
                for f in [pool.submit(_write_stripes, store, plan, part, src, fd, tally) for part in parts]:
                    f.result()
        if sync:
            os.fsync(fd)
    finally:
        if fd != plan.fd:   # a commit's new version stays open until its seal
            os.close(fd)
        if src is not None:
            os.close(src)


def _write_stripes(store: Store, plan: Plan, runs: list[tuple[int, int]], src: int | None, fd: int,
                   tally: Tally, listed: Sequence[Entry] | None = None) -> None:
    """Write the stripe ``runs`` into the new version, :data:`WRITE_SIZE` bytes at a time.

    A helper thread assembles the next batch of stripes into one buffer while
    this one writes the previous batch from the other. ``listed``: the
    snapshot's index entries over all ``runs`` (one batch), if listed already.
    """
    if not runs:
        return
    per = max(1, WRITE_SIZE // plan.align)
    parts = list(batches(runs, per))
    size = min(per, sum(b - a for a, b in runs)) * plan.align
    if len(parts) == 1:   # a small file: no helper thread for one batch, no renewal (mark_clean checks the lease)
        with borrowed(size) as one:
            for lo, view in assemble_runs(store, plan, parts[0], src, one, listed):
                pwrite_all(fd, view, lo, plan.target, tally)
        return
    with borrowed(size) as one, borrowed(size) as two, ThreadPoolExecutor(1) as helper:
        buffers = [one, two]
        ahead = helper.submit(assemble_runs, store, plan, parts[0], src, buffers[0])
        for i in range(len(parts)):
            pieces = ahead.result()
            if i + 1 < len(parts):
                ahead = helper.submit(assemble_runs, store, plan, parts[i + 1], src, buffers[(i + 1) % 2])
            for lo, view in pieces:
                pwrite_all(fd, view, lo, plan.target, tally)
            if not store.renew(plan.target, plan.token, snapshot.LEASE_SECONDS):
                raise LeaseLost()


def pwrite_all(fd: int, data: memoryview, offset: int, path: str, tally: Tally) -> None:
    """Write ``data`` at ``offset`` (one call unless the OS writes short) and count the calls."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "the BFS accepted no bytes")
        for observer in write_observers:
            observer(path, offset + done, n)
        done += n
    tally.add(offset, data)
    _start_writeback(fd, offset, len(data))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Let the OS write ``[offset, offset + length)`` to disk now, not all at the final fsync.

    ``POSIX_FADV_DONTNEED`` starts writeback of the range's dirty pages
    without waiting and drops them from the page cache once clean (the tier
    still holds the bytes). The disk then works while the next batch is
    fetched, and the final fsync has little left to do. Advice only: a
    filesystem that does not take it costs nothing.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _pread_into(fd: int, out: memoryview, offset: int) -> None:
    """Read ``len(out)`` bytes at ``offset`` into ``out``; past the end of file ``out`` keeps its zeros."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            return
        done += n


def verify_stripes(work: str, crcs: list[tuple[int, int, int]]) -> None:
    """Read back each written stripe and compare its CRC-32 with what was written."""
    if not crcs:
        return
    buf = memoryview(bytearray(max(n for _, n, _ in crcs)))
    fd = os.open(work, os.O_RDONLY)
    try:
        for offset, n, crc in crcs:
            view = buf[:n]
            view[:] = bytes(n)
            _pread_into(fd, view, offset)
            if zlib.crc32(view) != crc:
                raise FlushError(f"verification found different bytes at offset {offset} than were written")
    finally:
        os.close(fd)


def copy_data(src: int, dst: int, lo: int, hi: int) -> None:
    """Copy the bytes ``[lo, hi)`` of ``src`` to the same offsets of ``dst``, holes left as holes.

    Data segments are found with ``SEEK_DATA`` / ``SEEK_HOLE`` and copied in
    the kernel (``copy_file_range``: a reflink on XFS and Btrfs, a
    server-side copy on NFS 4.2); where that is not available, through a
    bounded buffer.
    """
    pos = lo
    while pos < hi:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
            end = min(os.lseek(src, start, os.SEEK_HOLE), hi)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # only a hole is left
                return
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = pos, hi              # no hole detection here: copy it all
        if start >= hi:
            return
        copy_range(src, dst, start, end)
        pos = end


def copy_range(src: int, dst: int, lo: int, hi: int) -> None:
    """Copy ``[lo, hi)`` of ``src`` to ``dst`` at the same offsets (short only at the source's end)."""
    pos = lo
    try:
        while pos < hi:
            n = os.copy_file_range(src, dst, min(hi - pos, 1 << 30), pos, pos)
            if n == 0:
                return
            pos += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    with borrowed(min(WRITE_SIZE, hi - pos)) as buf:
        while pos < hi:
            view = buf[:min(len(buf), hi - pos)]
            n = os.preadv(src, [view], pos)
            if n == 0:
                return
            done = 0
            while done < n:
                done += os.pwrite(dst, view[done:n], pos + done)
            pos += n


def finish(store: Store, plan: Plan, verify: bool) -> str | None:
    """Set the final size, fsync, rename the new version into place, verify, mark the snapshot clean (rank 0).

    Returns the SHA-256 of the published file when ``verify``, else None.
    """
    seal(plan)
    publish([plan])
    return settle(store, plan, verify)


def seal(plan: Plan) -> None:
    """Give the new version its final size and attributes, and fsync it.

    When the flusher may not give it the owner or group of the file it
    replaces (another user's file it may write, in a shared project
    directory), a rename would change who owns that file: its new bytes are
    copied into the existing file instead, as a direct write would rewrite it
    (``plan.in_place``; without the rename's all-or-nothing, but the data
    stays dirty in the tier until this is done, so a failure is retried).
    """
    fd = plan.fd if plan.fd is not None else os.open(plan.work, os.O_RDWR | os.O_NOFOLLOW)
    plan.fd = None
    try:
        if (plan.end if plan.end is not None else os.fstat(fd).st_size) != plan.size:
            os.ftruncate(fd, plan.size)
        # visible only with its final mode (mpiburst.perms)
        if give_final_attrs(fd, plan.target, plan.umask, plan.listed_acl):
            os.fsync(fd)
        else:
            _rewrite_in_place(fd, plan)
            plan.in_place = True
    finally:
        os.close(fd)


def _rewrite_in_place(src: int, plan: Plan) -> None:
    """Copy the new version open as ``src`` over the bytes of the existing ``plan.target``, trim and fsync it."""
    dst = os.open(plan.target, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        copy_range(src, dst, 0, plan.size)   # every byte: a hole of the new version is zeros to write here
        os.ftruncate(dst, plan.size)
        os.fsync(dst)
    finally:
        os.close(dst)


def publish(plans: list[Plan]) -> None:
    """Rename each new version over its final name, then fsync the directories."""
    for plan in plans:
        if plan.in_place:
            os.unlink(plan.work)
            continue
        os.rename(plan.work, plan.target)
    for directory in dict.fromkeys(os.path.dirname(p.target) for p in plans):
        fsync_dir(directory)


def settle(store: Store, plan: Plan, verify: bool) -> str | None:
    """After the rename: verify, mark the snapshot clean, and unlock the BFS path.

    Returns the SHA-256 of the published file when ``verify``, else None.
    """
    try:
        checksum = None
        if verify:
            actual = os.stat(plan.target).st_size
            if actual != plan.size:
                raise FlushError(f"verification found {actual} bytes on the BFS instead of {plan.size}")
            checksum = file_sha256(plan.target, plan.align)
        if not FlushLease(store, plan.target, plan.token, snapshot.LEASE_SECONDS).mark_clean(plan.upto, plan.trunc):
            raise LeaseLost()
    finally:
        release_lock(plan.token)
    return checksum


def abort(store: Store, plan: Plan) -> None:
    """Undo what a failed flush can undo: remove its new version, give the lease and the lock back."""
    if plan.fd is not None:
        fd, plan.fd = plan.fd, None
        quiet(lambda: os.close(fd))
    quiet(lambda: os.unlink(plan.work))
    FlushLease(store, plan.target, plan.token, snapshot.LEASE_SECONDS).release()
    release_lock(plan.token)


def fsync_dir(directory: str) -> None:
    """Fsync ``directory``, so that the names created, renamed or removed in it last (a rename's durability)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Return the SHA-256 (hex) of the file at ``path``, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
