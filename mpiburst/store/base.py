"""The interface of a tier store: what the layers above may ask of the tier, grouped by concern.

A :class:`Store` holds a run's data and bookkeeping. Everything above this
package (the write-back file, the flush, residency, the engine, channels)
talks to the tier only through these methods; key names, scripts and the
server's exceptions stay inside the implementations. Three implementations:

* :class:`~mpiburst.store.redis_store.RedisStore` over a real Redis or Valkey
  server (production, integration tests);
* :class:`~mpiburst.store.cluster_store.ClusterStore` over one server per
  node of a multi-node run, joined into one cluster;
* :class:`~mpiburst.store.memory.MemoryStore`, pure Python in one process
  (fast unit tests).

All must pass the same contract suite, :class:`mpiburst.testing.store.StoreTests`.

Concerns:

file records
    :meth:`~Store.meta`, :meth:`~Store.create`, :meth:`~Store.files`,
    :meth:`~Store.drop`, :meth:`~Store.set_pinned`, :meth:`~Store.set_size`
data
    :meth:`~Store.commit`, :meth:`~Store.writer` (pipelined commits),
    :meth:`~Store.extents`, :meth:`~Store.window`, :meth:`~Store.all_extents`,
    :meth:`~Store.fetch_into`, :meth:`~Store.blobs`, :meth:`~Store.drop_clean`
the flush lease
    :meth:`~Store.flush_lease` (a :class:`FlushLease` context manager) over
    :meth:`~Store.lease`, :meth:`~Store.renew`, :meth:`~Store.begin`,
    :meth:`~Store.mark_clean`, :meth:`~Store.release`, :meth:`~Store.leased`
channels (mem_io's streams)
    :meth:`~Store.channel_open`, :meth:`~Store.channel_append`,
    :meth:`~Store.channel_close`, :meth:`~Store.channel_states`,
    :meth:`~Store.channel_read`, :meth:`~Store.channel_reset`
request queue (for the engine)
    :meth:`~Store.enqueue`, :meth:`~Store.dequeue`, :meth:`~Store.queued`
shared file pointers (``mpiburst.File``, one per open of a file)
    :meth:`~Store.shared_pointer`, :meth:`~Store.set_shared_pointer`,
    :meth:`~Store.drop_shared_pointer`
I/O statistics (``mpiburst report``; not data: they survive ``drop`` and do not count in ``empty``)
    :meth:`~Store.stats_add`, :meth:`~Store.stats_log`, :meth:`~Store.stats`
the whole store
    :meth:`~Store.memory`, :meth:`~Store.empty`, :meth:`~Store.close`
where the data lies (optional, several nodes)
    :attr:`~Store.placement`: None, or a :class:`Placement`

Errors: a store raises only :mod:`mpiburst.errors` exceptions
(:class:`~mpiburst.errors.TierFullError` when the tier is out of memory,
:class:`~mpiburst.errors.TierConnectionError` when the server cannot be
reached, :class:`~mpiburst.errors.ServerError` for anything else the server
refuses), plus :class:`RecordGone` from commits.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, NamedTuple

from ..errors import MpiburstError
from ..overlay import Entry, Extent, Strided, expand

#: Longest extent in the index, in bytes; bounds the slack of range queries.
MAX_EXTENT = 256 << 10
#: Longest span (first block's start to last block's end) of a strided run in the index; bounds
#: the slack of range queries on the strided runs, which are few (one per batch and pattern).
MAX_SPAN = 64 << 20
#: Largest blob one commit carries (well below the server's 512 MB bulk limit).
MAX_BLOB = 64 << 20

#: A batch's bytes: anything exposing the buffer protocol as bytes.
Payload = bytes | bytearray | memoryview


class NewFile(NamedTuple):
    """A record a batch makes first, unless it exists: ``Store.create(path, None, umask, writing=True, looked=False)``.

    A new file opened by one process with ``MODE_CREATE`` sends nothing at
    its open: its record goes out with its first batch (:meth:`BatchWriter.send`),
    in the same round trip.
    """

    umask: int | None


class RecordGone(Exception):
    """A commit did not run and can simply be sent again: its file has no record (purged or
    deleted meanwhile: register it first) or the server had lost the commit script."""


class StaleNumbers(Exception):
    """A batch numbered elsewhere (a cluster store's global counter) was refused: its numbers are at or below
    the fence a flush or truncation raised on its node since. It must be numbered anew."""


def index_member(e: Entry) -> bytes:
    """Return the member that names entry ``e`` in the index: ties at one offset sort by it, as the server does."""
    return f"{e.seq}:{e.boff}:{e.length}:{e.blob}".encode()


def index_order(e: Entry) -> tuple[int, bytes]:
    """The index order of every store: by offset, then by member (as a server orders ties at one score)."""
    return e.start, index_member(e)


def blocks(entries: list[Entry], lo: int, hi: int) -> list[Extent]:
    """Return ``entries`` (in index order) with strided runs expanded to their blocks overlapping ``[lo, hi)``."""
    if not any(isinstance(e, Strided) for e in entries):
        return entries  # type: ignore[return-value]
    return sorted((b for b in expand(entries, lo, hi) if b.end > lo), key=index_order)


def batch_end(extents: Sequence[Sequence[int]]) -> int:
    """Return the file offset one past the last byte of a batch's extents (plain or strided, see :meth:`Store.commit`)."""
    return max(e[0] + (e[3] - 1) * e[4] + e[2] if len(e) > 3 and e[3] > 1 else e[0] + e[2] for e in extents)


def file_id(path: str) -> str:
    """Return the tier's identifier of the BFS file ``path`` (an absolute path)."""
    return hashlib.sha1(path.encode()).hexdigest()[:20]


@dataclass
class FileMeta:
    """What the tier knows about one file, beside its extents.

    Attributes
    ----------
    path : str
        Absolute BFS path.
    size : int
        Logical size (writes, ``Set_size`` and the BFS size at creation).
    seq : int
        Last sequence number handed out.
    clean : int
        Every extent with ``seq <= clean`` is on the BFS.
    pending : int
        Snapshot being flushed now (0 when none).
    trunc : int or None
        BFS bytes at or past this offset are stale (a truncation to apply).
    pinned : bool
        Exempt from automatic sync and purge.
    bfs : bool
        The BFS file is known to hold this file's clean data.
    unlooked : bool
        Made without looking at the BFS (``create(..., looked=False)``): a
        BFS file there may hold bytes past ``size``, and ``bfs`` is not yet
        known. Whoever needs the starting size looks the BFS file up and
        joins it with :meth:`Store.found_on_bfs` (:mod:`mpiburst.lookup`).
    umask : int or None
        The umask of the process that first created or opened the file
        through mpiburst: the flush gives new BFS files and directories the
        mode it gives (:mod:`mpiburst.perms`). None if not recorded.
    writers : int
        Handles that have the file open for writing (an ``mpiburst.File``
        counts once for all its ranks); counted by :meth:`Store.writers`. A
        handle whose process died is never closed: its file stays written.
    truncs : int
        Truncations (``set_size`` calls) so far.
    settled, settled_size, settled_truncs
        The file as the application last left it consistent while written
        (its sequence number, size and truncation count then): when the
        first writer opened it, or at a ``Sync`` of the only writer.
        Meaningful while ``writers`` > 0; with no writer the whole record is
        consistent.
    """

    path: str
    size: int
    seq: int
    clean: int
    pending: int
    trunc: int | None
    pinned: bool
    bfs: bool
    umask: int | None = None
    writers: int = 0
    settled: int = 0
    settled_size: int = 0
    truncs: int = 0
    settled_truncs: int = 0
    unlooked: bool = False

    @property
    def dirty(self) -> bool:
        """True if the tier holds writes, or a truncation, not yet on the BFS, or the BFS may lack the file.

        A new file is dirty until a flush has made it on the BFS, even with
        no byte written: ``MPI.File.Open`` with ``MODE_CREATE`` makes a file.
        """
        return self.seq > self.clean or self.trunc is not None or not self.bfs

    def settled_state(self) -> FileMeta | None:
        """Return the record cut at the last state the application made consistent (what may be published).

        Itself when no handle has the file open for writing. For a file being
        written, the record as it was at its settled mark (sequence number,
        size, truncation), so a flush up to it publishes exactly that state;
        not dirty when the BFS already holds it or something newer. None when
        the BFS lacks that state and the tier cannot give it any more: a
        truncation since the mark clipped its extents (the caller waits for
        the next consistent point).
        """
        if self.writers <= 0:
            return self
        if self.settled <= self.clean:
            # Nothing settled past what the BFS holds. For a new file the BFS lacks, that is nothing at all: it
            # is made on the BFS at its Close, never empty (half-written) under its name while being written.
            return replace(self, seq=self.clean, trunc=None, bfs=True)
        if self.truncs != self.settled_truncs:
            return None
        # No truncation since the mark: the pending one, if any, is the settled state's own.
        return replace(self, seq=self.settled, size=self.settled_size, writers=0)


class Blob(NamedTuple):
    """One committed batch of a file: its id, last sequence number, extents, bytes and channel."""

    blob: int
    last: int
    extents: int
    bytes: int
    channel: int


class ChannelState(NamedTuple):
    """One mem_io channel: whether a writer has it open, its bytes and its completed stores."""

    open: bool
    bytes: int
    stores: int


class BatchWriter(ABC):
    """One writer's pipelined commits: a batch is sent, and its answer read later.

    At most one batch is in flight: :meth:`send` it, fill the next one, then
    :meth:`finish`. Obtained from :meth:`Store.writer`; :meth:`close` it.
    """

    #: Whether the last batch sent with ``new`` made that record (and counted its handle in), once :meth:`finish`
    #: returned or raised, or :meth:`send` raised: a batch not stored may have made it or not.
    made = False

    @abstractmethod
    def send(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
             closing: bool = False, new: NewFile | None = None) -> None:
        """Send one batch (see :meth:`Store.commit`) without waiting for the answer.

        ``closing``: the batch is the last of a handle counted among the
        file's writers (:meth:`Store.writers`); once the batch is stored the
        handle is counted out (as ``writers(path, -1)``), on one server in
        the same round trip (a small file's Close costs one round trip, not
        two). A batch that is not stored (:meth:`finish` raises) leaves the
        count as it was.

        ``new``: the file's record is made first unless it exists, as
        :meth:`Store.create` ``(path, None, new.umask, writing=True,
        looked=False)`` does, on one server in the same round trip (a new
        small file's Open, Write and Close cost one round trip). When the
        batch is not stored, :attr:`made` says whether the record was.
        """

    @abstractmethod
    def finish(self) -> int:
        """Wait for the batch sent last; return its first sequence number.

        Raises
        ------
        TierFullError, RecordGone
            The batch was not stored; the caller still holds it and may
            commit it again.
        """

    @abstractmethod
    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        """Add I/O counters as :meth:`Store.stats_add` does; with a batch in flight, in its round trip.

        On one server the counters go behind the batch on the writer's
        connection and their answer is read with the batch's by
        :meth:`finish` (a small file's Close costs one round trip for its
        last batch and its counters, not two); without a batch in flight, or
        on another store, they are added at once.
        """

    @abstractmethod
    def close(self) -> None:
        """Give the writer's resources back (its connection)."""


class FlushLease:
    """A file's flush lease, as a context manager: leaving the block by an exception gives it back.

    The flush that holds it :meth:`begin` s a snapshot, :meth:`renew` s the
    lease while it writes, and ends it with :meth:`mark_clean` (which only
    succeeds while the lease is still held). Other flushers of the same
    snapshot (the ranks of a collective sync) join it with the same token.

    Parameters
    ----------
    store
        The store holding the file.
    path
        The file's BFS path.
    token
        The lease's token (from :meth:`Store.lease`).
    seconds
        How long each :meth:`renew` extends the lease.
    """

    def __init__(self, store: Store, path: str, token: str, seconds: float) -> None:
        self.store = store
        self.path = path
        self.token = token
        self.seconds = seconds
        self.ended = False

    def begin(self) -> FileMeta:
        """Record that a flush of everything written so far started; return the snapshot's record."""
        return self.store.begin(self.path)

    def renew(self) -> bool:
        """Extend the lease; False if it was lost (expired, or released by a failing flusher)."""
        return self.store.renew(self.path, self.token, self.seconds)

    def mark_clean(self, upto: int, trunc: int | None) -> bool:
        """Declare extents up to ``upto`` clean (and ``trunc`` applied) and end the lease; False if lost."""
        done = self.store.mark_clean(self.path, self.token, upto, trunc)
        self.ended = self.ended or done
        return done

    def release(self) -> None:
        """Give the lease back (the data stays dirty); a failure to do so is ignored."""
        if self.ended:
            return
        self.ended = True
        with contextlib.suppress(MpiburstError):  # the lease then expires by itself
            self.store.release(self.path, self.token)

    def __enter__(self) -> FlushLease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.release()


class Placement(ABC):
    """Where a store's data lies, for a store spread over the servers of several nodes (:attr:`Store.placement`).

    A flush whose ranks span several nodes uses it to have each stripe
    written by a rank of the node holding most of its bytes
    (:mod:`mpiburst.flush.locality`).
    """

    @property
    @abstractmethod
    def nodes(self) -> int:
        """The number of nodes (servers)."""

    @property
    @abstractmethod
    def local(self) -> int | None:
        """This process's node (its writes go to that node's server); None for a process on no node."""

    @abstractmethod
    def holders(self, path: str) -> list[int]:
        """Return the nodes whose servers hold data of ``path``, in node order (none: ``[]``)."""

    @abstractmethod
    def node_index(self, path: str, node: int) -> Iterator[Entry]:
        """Yield the index entries of ``path`` held by ``node``'s server, each once, asking that server only.

        Blob ids are that node's own: enough to see where the file's bytes lie.
        """


class Store(ABC):
    """A run's data and bookkeeping in the tier (see the module docstring for the concerns)."""

    # -- file records -------------------------------------------------------
    @abstractmethod
    def meta(self, path: str) -> FileMeta | None:
        """Return the tier's record of ``path``, or None if the tier does not know it."""

    @abstractmethod
    def create(self, path: str, bfs_size: int | None, umask: int | None = None,
               writing: bool = False, looked: bool = True) -> FileMeta:
        """Make the tier's record of ``path`` unless it exists; return the record.

        ``bfs_size`` is the size of the BFS file (None when there is none):
        the logical size starts there. ``looked`` False: the BFS was not
        looked at (``bfs_size`` is then ignored): a new record starts at size
        0 and is :attr:`FileMeta.unlooked` until :meth:`found_on_bfs`; a
        record that exists is kept as it is. ``umask`` is the creating process's
        umask, kept for the flush (:attr:`FileMeta.umask`). With ``writing``
        the call also counts a handle opening the file for writing, as
        :meth:`writers` ``(path, 1, 1)`` does, atomically with the create and
        in the same round trip (an open for writing costs one call, not two);
        the record returned has that count.
        """

    @abstractmethod
    def found_on_bfs(self, path: str, bfs_size: int | None) -> FileMeta | None:
        """Join what the BFS holds at ``path`` (its size, None if nothing) to a record made unlooked; return it.

        Atomic, and only the first call changes the record: an
        :attr:`FileMeta.unlooked` record's size becomes the larger of its size
        and ``bfs_size`` (its settled size too), ``bfs`` says whether a BFS
        file exists, and the record is no longer unlooked. An unlooked record
        has had no truncation (:meth:`set_size` is preceded by this call), so
        the BFS bytes below the larger size are all the file's. Any other
        record is returned unchanged; None when there is no record.
        """

    @abstractmethod
    def files(self) -> dict[str, str]:
        """Return ``{path: file id}`` of every file the tier holds."""

    @abstractmethod
    def cut(self) -> dict[str, FileMeta]:
        """Return every file's record, all read in one atomic step: a consistent cut of the tier.

        A write acknowledged before the cut has a sequence number at most its
        file's ``seq`` in the cut; a write issued after it, a higher one. So
        a flush of each file up to its mark (:func:`mpiburst.flush.commit`)
        lands exactly the writes completed before the cut. ``pending`` is
        not part of the cut (0). The cluster store keeps every record on one
        node and numbers every batch there, so its cut is one read too; the
        argument for writes in flight is in :mod:`mpiburst.store.cluster_store`.
        """

    @abstractmethod
    def drop(self, path: str) -> None:
        """Remove the record and every byte of ``path`` from the tier (its data is lost)."""

    @abstractmethod
    def set_pinned(self, path: str, pinned: bool) -> None:
        """Pin (exempt from automatic sync and purge) or unpin ``path``."""

    @abstractmethod
    def writers(self, path: str, delta: int, settle_at_most: int = -1) -> int:
        """Count a handle opening (``delta`` 1) or closing (-1) ``path`` for writing; return the count.

        Atomically with the count, when the count after ``delta`` is at most
        ``settle_at_most``, the file's current sequence number, size and
        truncation become its settled mark (:attr:`FileMeta.settled`). An
        open passes 1 (no other writer: the state before it is consistent),
        a ``Sync`` of the only writer 0 with 1, an explicit sync a large
        number; a close passes -1 (with no writer left the whole record is
        consistent). The count never goes below 0. Returns -1, changing
        nothing, for a file the tier does not know.
        """

    @abstractmethod
    def set_size(self, path: str, size: int) -> int:
        """Set the logical size of ``path`` (which has a record), clipping extents past it; return the old size.

        Records ``trunc``, the offset past which the BFS bytes are stale,
        until a flush applies it.
        """

    # -- data ---------------------------------------------------------------
    @abstractmethod
    def commit(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
               staged: bool = False) -> int:
        """Store one batch: ``payload`` and its ``(file offset, payload offset, length)`` extents.

        Extents are listed in write order; each gets the next sequence number
        of the file, so later ones win. Every length must be at most
        :data:`MAX_EXTENT` and the payload at most :data:`MAX_BLOB`. An
        extent may also be a strided run ``(file offset, payload offset,
        length, count, stride)``: ``count >= 2`` blocks of ``length`` bytes,
        ``stride >= length`` apart in the file, packed in the payload, one
        index entry and one sequence number for them all (see
        :class:`~mpiburst.overlay.Strided`); its span must be at most
        :data:`MAX_SPAN`. With
        ``staged`` the batch is a copy of BFS bytes (prestage): sequence
        number 0, clean, older than every write.

        Returns
        -------
        int
            The sequence number of the first extent (0 when staged).

        Raises
        ------
        TierFullError
            If the tier is out of memory; nothing of the batch was stored.
        RecordGone
            If the file has no record; nothing was stored.
        """

    @abstractmethod
    def writer(self) -> BatchWriter:
        """Return a :class:`BatchWriter` for pipelined commits of one writer."""

    @abstractmethod
    def extents(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Extent]:
        """Return the extents of ``path`` that overlap ``[lo, hi)``, in offset order.

        With ``upto``, only those with ``seq <= upto`` (a flush snapshot).
        """

    def index(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Entry]:
        """Return the index entries of ``path`` overlapping ``[lo, hi)`` as stored: strided runs not expanded.

        Like :meth:`extents` (which a store without strided runs may simply
        return), but a strided run comes back as one
        :class:`~mpiburst.overlay.Strided` entry (some of whose blocks may lie
        outside the window), so a flush costs per entry, not per block.
        Order: by offset.
        """
        return list(self.extents(path, lo, hi, upto))

    def index_many(self, windows: Sequence[tuple[str, int, int, int | None]]) -> list[list[Entry]]:
        """:meth:`index` each of ``windows`` (path, lo, hi, upto) at one go; return each one's entries.

        A commit lists the index of all its small files this way (a store
        on a server: one round trip for many files, not one per file).
        """
        return [self.index(path, lo, hi, upto) for path, lo, hi, upto in windows]

    @abstractmethod
    def extents_from(self, path: str, start: int, count: int) -> list[Entry]:
        """Return the first ``count`` index entries of ``path`` that start at or after ``start``, in offset order.

        A walk of the index by offset (a flush plans its stripes this way, so
        holes cost nothing): extents removed meanwhile never make others be
        skipped, as paging by rank would. Strided runs come back as one
        :class:`~mpiburst.overlay.Strided` entry each (placed by their first
        block); a run that starts before ``start`` is not listed (find it
        with :meth:`index`).
        """

    def walk(self, path: str, lo: int = 0, hi: float = float("inf"), page: int = 4096) -> Iterator[Entry]:
        """Yield the index entries of ``path`` overlapping ``[lo, hi)`` in offset order, a page at a time.

        Built on :meth:`index` (the entries that start before ``lo`` and reach
        into it) and :meth:`extents_from`. Pages are taken by offset, not by
        rank in the index, so entries removed meanwhile (a purge of clean
        data) make none of the others be skipped; an entry may be yielded
        twice. A page whose entries all start at one offset is followed by
        one twice as large, so any number of entries at one offset is walked.
        Strided runs come as one entry each. Memory stays bounded by a page.
        """
        if lo > 0:
            yield from self.index(path, lo, lo + 1)
        pos = lo
        while pos < hi:
            found = self.extents_from(path, pos, page)
            for e in found:
                if e.start >= hi:
                    return
                yield e
            if len(found) < page:
                return
            if found[-1].start == pos:                    # a page of entries that all start at ``pos``
                page *= 2
            pos = found[-1].start

    @abstractmethod
    def window(self, path: str, lo: int, hi: int) -> tuple[FileMeta | None, list[Extent]]:
        """Return the file's record and the extents overlapping ``[lo, hi)``, at one instant."""

    @abstractmethod
    def all_extents(self, path: str) -> Iterator[Extent]:
        """Yield every extent of ``path`` in offset order."""

    @abstractmethod
    def fetch_into(self, path: str, extents: Iterable[Entry], lo: int, out: memoryview) -> bool:
        """Paint ``extents`` into ``out``, the window ``[lo, lo + len(out))`` of ``path``; the newest wins.

        Each extent (or block of a strided run) is clipped to the window;
        bytes no extent covers are left as they were.

        Returns
        -------
        bool
            False if an extent's bytes vanished meanwhile (a purge): ``out``
            is then incomplete and the caller must look again.
        """

    @abstractmethod
    def blobs(self, path: str, lo_seq: float = 0, hi_seq: float = float("inf")) -> list[Blob]:
        """Return the batches of ``path`` whose last sequence number is in ``[lo_seq, hi_seq]``.

        Ordered by last sequence number (staged batches, all 0, first).
        """

    @abstractmethod
    def drop_clean(self, path: str) -> int:
        """Free the batches of ``path`` whose extents are all clean; return the bytes freed.

        The file's record stays, so reads fall through to the BFS copy.
        """

    # -- the flush lease ----------------------------------------------------
    @abstractmethod
    def lease(self, path: str, seconds: float) -> str | None:
        """Take the flush lease of ``path`` for ``seconds``; return its token, or None if it is held."""

    @abstractmethod
    def renew(self, path: str, token: str, seconds: float) -> bool:
        """Extend the lease ``token`` holds to ``seconds`` from now; False if it was lost."""

    @abstractmethod
    def begin(self, path: str) -> FileMeta:
        """Record that a flush of everything written so far started (``pending = seq``); return the record."""

    @abstractmethod
    def mark_clean(self, path: str, token: str, upto: int, trunc: int | None) -> bool:
        """If ``token`` holds the lease: extents up to ``upto`` are clean, ``trunc`` is applied, the lease ends.

        Returns False (and changes nothing) when the lease was lost.
        """

    @abstractmethod
    def release(self, path: str, token: str) -> None:
        """Give the lease back after a failed flush, if ``token`` still holds it; the data stays dirty."""

    @abstractmethod
    def leased(self, path: str) -> bool:
        """True while some flush holds the lease of ``path``."""

    def flush_lease(self, path: str, seconds: float) -> FlushLease | None:
        """Take the flush lease of ``path``; return it as a :class:`FlushLease`, or None if it is held."""
        token = self.lease(path, seconds)
        return None if token is None else FlushLease(self, path, token, seconds)

    def lease_and_begin(self, paths: Sequence[str], seconds: float) -> list[tuple[str, FileMeta] | None]:
        """Take the flush lease of each of ``paths`` and, where taken, :meth:`begin` its snapshot; at one go.

        A commit of many files takes all its leases this way (a store on a
        server: one round trip for all, not two per file). Returns, per
        path, the lease's token and the snapshot's record (an empty record,
        ``path == ""``, for a file the tier no longer holds), or None where
        another flush holds the lease (nothing of that file is changed).
        Each file as :meth:`lease` then :meth:`begin` would do it.
        """
        out: list[tuple[str, FileMeta] | None] = []
        for path in paths:
            token = self.lease(path, seconds)
            out.append(None if token is None else (token, self.begin(path)))
        return out

    def renew_many(self, leases: Sequence[tuple[str, str]], seconds: float) -> list[bool]:
        """:meth:`renew` each of ``leases`` (path, token) at one go; return whether each was still held."""
        return [self.renew(path, token, seconds) for path, token in leases]

    def mark_clean_many(self, flushes: Sequence[tuple[str, str, int, int | None]]) -> list[bool]:
        """:meth:`mark_clean` each of ``flushes`` (path, token, upto, trunc) at one go; return each one's answer.

        Each file is marked (or not, its lease lost) as :meth:`mark_clean`
        does, on its own: a lost lease of one leaves the others marked.
        """
        return [self.mark_clean(path, token, upto, trunc) for path, token, upto, trunc in flushes]

    # -- channels -----------------------------------------------------------
    @abstractmethod
    def channel_open(self, channel: int) -> str | None:
        """Open ``channel`` for one writer; return the writer's token, or None if it is open already."""

    @abstractmethod
    def channel_append(self, channel: int, pieces: Sequence[bytes], stored: bool = False) -> None:
        """Append ``pieces`` to ``channel``'s data; ``stored``: a store to it completed (counted).

        Raises
        ------
        TierFullError
            If the tier is out of memory (pieces appended before stay).
        """

    @abstractmethod
    def channel_close(self, channel: int, token: str) -> None:
        """Close ``channel`` if the writer with ``token`` still has it open."""

    @abstractmethod
    def channel_states(self, channels: Sequence[int]) -> list[ChannelState]:
        """Return the state of each of ``channels``, at one instant."""

    @abstractmethod
    def channel_read(self, channel: int, start: int, count: int) -> list[bytes]:
        """Return up to ``count`` pieces of ``channel``'s data from piece number ``start`` on."""

    @abstractmethod
    def channel_reset(self, channels: Sequence[int]) -> list[bool]:
        """Close each of ``channels`` whoever holds it; return which of them were open."""

    # -- request queue ------------------------------------------------------
    @abstractmethod
    def enqueue(self, request: bytes) -> None:
        """Append a request (for the automatic engine) to the queue."""

    @abstractmethod
    def dequeue(self, timeout: float = 0.0) -> bytes | None:
        """Remove and return the oldest request; wait up to ``timeout`` seconds for one (None if none)."""

    @abstractmethod
    def queued(self) -> int:
        """Return the number of requests waiting."""

    # -- shared file pointers -----------------------------------------------
    @abstractmethod
    def shared_pointer(self, path: str, token: str, delta: int = 0) -> int:
        """Add ``delta`` to the shared file pointer of open ``token`` of ``path`` atomically; return its value before.

        A pointer never set starts at 0.
        """

    @abstractmethod
    def set_shared_pointer(self, path: str, token: str, value: int) -> None:
        """Set the shared file pointer of open ``token`` of ``path``."""

    @abstractmethod
    def drop_shared_pointer(self, path: str, token: str) -> None:
        """Forget the shared file pointer of open ``token`` (the file is closed)."""

    # -- I/O statistics -----------------------------------------------------
    @abstractmethod
    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        """Add ``counters`` (name -> integer) to those of file ``path`` and process ``who``, in one call.

        Runs even when the tier is full (a close must not fail for its counters)."""

    @abstractmethod
    def stats_log(self, event: Mapping[str, Any]) -> None:
        """Append ``event`` (JSON-serialisable) to the run's event log (one per flush, say)."""

    def stats_log_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Append each of ``events`` to the run's event log, in order, at one go (a commit's flushes)."""
        for event in events:
            self.stats_log(event)

    @abstractmethod
    def stats(self) -> tuple[dict[str, dict[str, dict[str, int]]], list[dict[str, Any]]]:
        """Return every file's counters (path -> process -> name -> value) and the event log, oldest first."""

    # -- the whole store ----------------------------------------------------
    @abstractmethod
    def memory(self) -> tuple[int, int]:
        """Return ``(bytes used, limit)`` of the tier's memory; a limit of 0 means none."""

    @property
    def placement(self) -> Placement | None:
        """Where the data lies across the nodes of a multi-node store; None for one server (or this process).

        Optional: only a store spread over several servers
        (:class:`~mpiburst.store.cluster_store.ClusterStore`) gives one.
        """
        return None

    def node_memory(self) -> list[tuple[int, int]]:
        """Return ``(bytes used, limit)`` of each server, in node order (one server: its :meth:`memory`).

        A multi-node run's servers fill separately, so a threshold must be
        held against each of them (the engine relieves the fullest).
        """
        return [self.memory()]

    @abstractmethod
    def traffic(self) -> tuple[int, int] | None:
        """Return the bytes the tier's server(s) received and sent since they started (all nodes' sum).

        None where no server carries the data (the memory store).
        """

    @abstractmethod
    def empty(self) -> bool:
        """True if the store holds nothing at all (no file, channel or request; statistics do not count)."""

    def confirm(self, timeout: float | None = None) -> None:
        """Return once this process's writes are as safe as the store makes them: on a node and its replica.

        What ``Sync``, ``Close``, ``mem_io_store`` and a run's commit points
        call before they return. A store without replicas has nothing to wait
        for (this default). See :meth:`ClusterStore.confirm
        <mpiburst.store.cluster_store.ClusterStore.confirm>`.
        """
        return None

    @abstractmethod
    def close(self) -> None:
        """Close the store's connections; the data stays."""
