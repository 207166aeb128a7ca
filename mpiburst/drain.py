"""The drain: write the full chunks of a new file to the BFS while the application still writes it.

A flush starts when someone asks for it (``mpiburst.sync``, the engine), so
for a large file the time to durable data is the absorb *plus* the whole
write to the BFS. The drain overlaps the two: while a :class:`mpiburst.File`
that does not exist on the BFS yet is open for writing, a thread in every
rank watches the tier, and each chunk of :data:`CHUNK` bytes (whole stripes,
aligned) that the writes have covered completely is assembled and written,
at its offset, into a data file beside the target,
``.<name>.mpiburst-drain-<token>``. Rank ``r`` of ``n`` takes the chunks
``c`` with ``c % n == r``; the last, partial chunk is left to the flush.

The drain never publishes anything and never marks anything clean. When the
file is closed, every rank stops its thread (after a barrier, no drain writes
any more), fsyncs the data file and leaves a record beside it,
``.<name>.mpiburst-drain-<token>.<rank>.json``: for each chunk it wrote, the
sequence number it assembled up to and a digest of the extents it used (how
many, the sum of their sequence numbers). The next flush of the file
(:func:`mpiburst.flush.sync` or a commit, in any process) *claims* the data
file under its BFS lock and lease and uses it as its new version; it then
skips a drained chunk only if the snapshot's extents of that chunk are
exactly the ones the drain used: none newer (the application wrote the chunk
again), none missing or added (purged, truncated, or committed late in
another node's shard). Every other chunk is written as usual. So what is
published and marked clean is the snapshot and nothing else, and it is
written and fsync'd before the rename as always (docs/reliability.md).

The drain is an optimisation, never a requirement: any failure (a full BFS,
a lost connection, another flush deleting the data file meanwhile) stops it
quietly and leaves the whole file to the flush.

It is off unless ``MPIBURST_DRAIN=1``: measured on a 2-core node where the
ranks, the tier's server and the filesystem's client share the cores, the
drain slowed the application's writes about twice as much as it shortened
the time to durable data (docs/benchmarks.md). It pays where the node has
cores to spare, or where the application writes over a longer time than the
filesystem needs to take the bytes (output written between computations). A run discarded without a flush leaves its data file and records
beside the target; the next flush of that path removes them, and
``File.Delete`` does too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import threading
from dataclasses import dataclass

from .assembly import current_bytes
from .buffers import borrowed
from .overlay import Extent, gaps
from .perms import has_default_acl
from .store import Store

#: Bytes of one drained chunk (rounded down to whole stripes, at least one): the flush's write size.
CHUNK = 8 << 20
#: Seconds between two looks at the tier when no chunk is ready.
POLL = 0.02
#: Niceness of the drain thread: the application's own threads come first on a busy node.
NICE = 10
#: The environment variable that turns the drain on (``1``, ``on``, ``yes``, ``true``).
ENV = "MPIBURST_DRAIN"

_log = logging.getLogger(__name__)


def enabled() -> bool:
    """True if ``$MPIBURST_DRAIN`` turns the drain on."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "yes", "true")


def chunk_bytes(align: int) -> int:
    """Return the drain's chunk size for stripes of ``align`` bytes."""
    return max(1, CHUNK // align) * align


def data_path(target: str, token: str) -> str:
    """Return the path of the drain's data file of ``target``."""
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}.mpiburst-drain-{token}")


def _record_path(target: str, token: str, rank: int) -> str:
    return f"{data_path(target, token)}.{rank}.json"


def _identity(st: os.stat_result) -> list[int]:
    """Device, inode, size and modification time of a data file: another file at its path (removed and
    created again, which may reuse the inode number) or one written since differs."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _digest(extents: list[Extent]) -> tuple[int, int]:
    return len(extents), sum(e.seq for e in extents)


class Drain:
    """One rank's drain of one file (see the module docstring).

    Parameters
    ----------
    store
        The tier's store (shared with the writer: its methods are thread-safe).
    target
        The file's BFS path.
    token
        Names the data file; the same on every rank of the file's communicator.
    align
        The tier's stripe size.
    rank, nprocs
        This rank and the number of ranks draining the file.
    """

    def __init__(self, store: Store, target: str, token: str, align: int, rank: int, nprocs: int) -> None:
        self.store = store
        self.target = target
        self.token = token
        self.rank = rank
        self.nprocs = nprocs
        self.chunk = chunk_bytes(align)
        #: chunk index -> (sequence number assembled up to, extents used, sum of their sequence numbers)
        self.done: dict[int, tuple[int, int, int]] = {}
        self._next = rank
        self._looked = -1               # the file's sequence number at the last look that found no ready chunk
        self._fd: int | None = None
        self._ok = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mpiburst-drain")
        self._thread.start()

    # -- the thread ---------------------------------------------------------------
    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)   # this thread only (Linux)
        try:
            with borrowed(self.chunk) as buf:
                while not self._stop.wait(POLL):
                    while not self._stop.is_set() and self._round(buf):
                        pass
        except Exception as exc:  # noqa: BLE001 - an optimisation: the flush writes what the drain did not
            _log.debug("drain of %s stopped: %s", self.target, exc)
            self._ok = False

    def _round(self, buf: memoryview) -> bool:
        """Drain this rank's next chunk if the writes cover it now; True if it was written.

        The index is looked at only when the file has new writes since the
        last look (its sequence number moved) and has reached past the chunk.
        """
        meta = self.store.meta(self.target)
        if meta is None or meta.trunc is not None or meta.clean > 0:
            self._stop.set()            # deleted, truncated, or flushed meanwhile: leave it to the flush
            return False
        if meta.seq == self._looked or (self._next + 1) * self.chunk > meta.size:
            return False
        self._looked = meta.seq
        if not self._drain_chunk(self._next, meta.seq, buf):
            return False
        self._next += self.nprocs
        self._looked = -1
        return True

    def _drain_chunk(self, c: int, upto: int, buf: memoryview) -> bool:
        """Write chunk ``c`` as of sequence number ``upto`` if the writes cover it; True if written."""
        lo = c * self.chunk
        extents = self.store.extents(self.target, lo, lo + self.chunk, upto=upto)
        if not extents or gaps(lo, lo + self.chunk, extents):
            return False
        if not current_bytes(self.store, self.target, lo, buf, extents=extents) or self._stop.is_set():
            return False                # (stopping: the file's close is waiting; the flush writes the chunk)
        fd = self._open()
        done = 0
        while done < len(buf):
            n = os.pwrite(fd, buf[done:], lo + done)
            if n <= 0:
                raise OSError("the BFS accepted no bytes")
            done += n
        with contextlib.suppress(OSError):   # start the write-back now, so the fsync at close has little left
            os.posix_fadvise(fd, lo, len(buf), os.POSIX_FADV_DONTNEED)   # (as the flush does)
        self.done[c] = (upto, *_digest(extents))
        return True

    def _open(self) -> int:
        if self._fd is None:
            path = data_path(self.target, self.token)
            mode = 0o666 if has_default_acl(os.path.dirname(path)) else 0o600   # as perms.create_aside
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        return self._fd

    # -- the end ------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the thread and fsync what it wrote (never raises: a failure only loses the head start)."""
        self._stop.set()
        self._thread.join()
        if self._fd is not None and self.done and self._ok:
            try:
                os.fdatasync(self._fd)
            except OSError:
                self._ok = False

    def publish(self) -> None:
        """Leave the record of the drained chunks for the flush and close the data file (after :meth:`stop`
        on every rank)."""
        try:
            if self._fd is not None and self.done and self._ok:
                record = {"chunk": self.chunk, "file": _identity(os.fstat(self._fd)),
                          "done": {str(c): list(v) for c, v in self.done.items()}}
                path = _record_path(self.target, self.token, self.rank)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, json.dumps(record).encode())
                finally:
                    os.close(fd)
        except OSError as exc:
            _log.debug("drain record of %s not written: %s", self.target, exc)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop the thread and close the data file without a record (a failed close; the flush removes it)."""
        self._stop.set()
        self._thread.join()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def start(store: Store, target: str, token: str | None, align: int, rank: int, nprocs: int) -> Drain | None:
    """Return a running :class:`Drain` of ``target``, or None when ``token`` is None (rank 0 decided not to)."""
    if token is None:
        return None
    return Drain(store, target, token, align, rank, nprocs)


def wanted(target: str) -> bool:
    """True if a file opened for writing at ``target`` should be drained (rank 0 decides).

    Only a file that does not exist on the BFS: for an existing one the flush
    copies the kept bytes into its new version, which a drained chunk must
    not be overwritten by.
    """
    return enabled() and not os.path.lexists(target)


# ----------------------------------------------------------------------------- the flush's side

@dataclass
class Claim:
    """What a flush took over from a finished drain: the chunk size and the drained chunks."""

    chunk: int
    done: dict[int, tuple[int, int, int]]


def claim(target: str, work: str, align: int) -> Claim | None:
    """Move a finished drain's data file of ``target`` to ``work``; return its chunks, or None.

    Called by a flush that holds the target's BFS lock and flush lease, for a
    file that does not exist on the BFS, before it removes stale files. Of
    several drains (the file was opened more than once) the one with the most
    chunks is taken. A record whose data file is gone or is another file
    (removed and created again meanwhile) does not count.
    """
    directory, name = os.path.split(target)
    pattern = os.path.join(glob.escape(directory), f".{glob.escape(name)}.mpiburst-drain-*.*.json")
    found: dict[str, Claim] = {}
    for path in glob.glob(pattern):
        token = os.path.basename(path)[len(f".{name}.mpiburst-drain-"):].split(".")[0]
        try:
            with open(path, "rb") as f:
                record = json.load(f)
            chunk = int(record["chunk"])
            st = os.stat(data_path(target, token), follow_symlinks=False)
            if _identity(st) != record["file"] or chunk % align:
                continue
            done = {int(c): (int(v[0]), int(v[1]), int(v[2])) for c, v in record["done"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        have = found.setdefault(token, Claim(chunk, {}))
        if have.chunk == chunk:
            have.done.update(done)
    if not found:
        return None
    token, best = max(found.items(), key=lambda kv: len(kv[1].done))
    try:
        os.rename(data_path(target, token), work)
    except OSError:
        return None
    return best


def fresh_chunks(store: Store, target: str, claimed: Claim, upto: int, size: int, lo: int, hi: int) -> set[int]:
    """Return the claimed chunks overlapping ``[lo, hi)`` whose drained bytes are the snapshot's.

    A chunk counts only if it lies within ``size``, was assembled up to at
    most ``upto``, and the snapshot's extents of it (``seq <= upto``) are
    exactly those the drain used: none newer, none missing, none added.
    """
    out = set()
    for c, (drained_upto, count, seqs) in claimed.done.items():
        a, b = c * claimed.chunk, (c + 1) * claimed.chunk
        if b > size or drained_upto > upto or b <= lo or a >= hi:
            continue
        extents = store.extents(target, a, b, upto=upto)
        if all(e.seq <= drained_upto for e in extents) and _digest(extents) == (count, seqs):
            out.add(c)
    return out


def runs_to_write(runs: list[tuple[int, int]], claimed: Claim, fresh: set[int], align: int, first: int,
                  last: int) -> list[tuple[int, int]]:
    """Return the stripe runs a flusher of stripes ``[first, last)`` writes into a claimed data file.

    The stripes of ``fresh`` chunks are left out (the drain wrote them); every
    stripe of the other claimed chunks is put in (their drained bytes may be
    newer than the snapshot, so they are written again, zeros where the
    snapshot has no data).
    """
    per = claimed.chunk // align
    stale = [(max(first, c * per), min(last, (c + 1) * per)) for c in sorted(claimed.done) if c not in fresh]
    marks: list[tuple[int, int]] = sorted([r for r in runs] + [r for r in stale if r[0] < r[1]])
    merged: list[tuple[int, int]] = []
    for a, b in marks:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    out: list[tuple[int, int]] = []
    for a, b in merged:
        while a < b:
            end = min(b, (a // per + 1) * per)
            if a // per not in fresh:
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], end)
                else:
                    out.append((a, end))
            a = end
    return out


def remove_leftovers(target: str) -> None:
    """Remove the drain data files and records of ``target`` (a deleted file's)."""
    directory, name = os.path.split(target)
    for path in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.mpiburst-drain-*")):
        with contextlib.suppress(OSError):
            os.unlink(path)
