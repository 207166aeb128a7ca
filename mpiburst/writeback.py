"""One process's view of one tier file: a write-back buffer and tier-first reads.

Writes are appended to a bounded buffer and sent as large batches to the
process's channel (one blob + its extents per round trip), so small and
strided writes cost memory copies, not server round trips. Reads overlay the
tier's extents (newest wins) on the BFS file's bytes. Both :class:`mpiburst.File`
and :func:`mpiburst.open` are built on :class:`TierFile`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from time import perf_counter_ns, sleep
from typing import TypeVar

import numpy as np

from . import iostats
from .assembly import BfsBytes, current_bytes
from .errors import OffsetError, ServerError, TierConnectionError, TierFullError
from .lookup import looked
from .paths import bfs_stat
from .perms import current_umask
from .residency import make_room
from .sizes import parse_size
from .store import MAX_BLOB, MAX_EXTENT, MAX_SPAN, FileMeta, NewFile, RecordGone
from .tier import Tier

T = TypeVar("T")

#: End of the largest file the tier stores exactly: the index keeps extent offsets as
#: the server's sorted-set scores, doubles exact up to 2**53, and range queries reach
#: MAX_EXTENT below their start. Writes and sizes past it are refused (8 PiB).
MAX_OFFSET = 2**53 - MAX_EXTENT
#: Default size of a handle's write-back buffer (``MPIBURST_WR_BUFFER`` overrides); 4 MiB
#: measured best here between 1 and 8 MiB (see docs/benchmarks.md).
DEFAULT_BUFFER = 4 << 20
#: Bytes a batch leaves unused below the buffer size. The server stores a value
#: with a header and the protocol's CRLF in one allocation; a payload of exactly
#: 4 MiB needs a 5 MiB allocator class (1.25-1.4 bytes of memory per byte),
#: 64 bytes less fits the 4 MiB class.
BLOB_SLACK = 64
#: Rounds in a row of flushing and freeing that free nothing before a full tier is reported.
_ROOM_TRIES = 3
#: Seconds a writer naps after such a round, times the rounds so far: another process may be freeing memory.
_ROOM_NAP = 0.01
#: Length of a handle's list of write calls (two entries per call) at which a write counts it (iostats).
_DIGEST_AT = 2 * iostats.DIGEST_CALLS
#: Writes smaller than this check the length of that list themselves: a batch holds at most
#: ``room / _SMALL_WRITE`` larger ones, and the list is counted at each batch sent (:meth:`TierFile._count_calls`).
_SMALL_WRITE = 512
#: Length of that list from which a batch sent counts it (fewer calls wait for a later batch or the close):
#: a count's fixed cost is a few microseconds.
_COUNT_AT_PUSH = 2 * 128
#: How often a read is retried when a purge freed its data while it ran.
_READ_TRIES = 5


def buffer_size(hint: str | int | None = None) -> int:
    """Return the write-back buffer size: ``hint``, else ``$MPIBURST_WR_BUFFER``, else 4 MiB."""
    value = hint if hint not in (None, "") else os.environ.get("MPIBURST_WR_BUFFER")
    if value in (None, ""):
        return DEFAULT_BUFFER
    return max(parse_size(value, "write buffer size"), 1)


class TierFile:
    """Buffered writes to, and tier-first reads from, one file for one process.

    Parameters
    ----------
    tier
        The run's :class:`mpiburst.Tier`.
    path
        Absolute BFS path of the file (already resolved and inside the root).
    channel
        This writer's channel (rank modulo the run's channels).
    buffer
        Write-back buffer size in bytes.
    new
        The file's record is not made yet: it goes out with the first batch,
        in the same round trip (:meth:`~mpiburst.store.BatchWriter.send`),
        or alone when something needs it before (:meth:`push`, :meth:`close`).
        A new file opened by one process with ``MODE_CREATE`` (docs/api.md).
    """

    def __init__(self, tier: Tier, path: str, channel: int, buffer: int = DEFAULT_BUFFER,
                 new: NewFile | None = None) -> None:
        self.tier = tier
        self.store = tier.store
        self.path = path
        self.channel = channel
        self.limit = buffer
        self._payload = bytearray()
        self._extents: list[list[int]] = []
        self._inflight: tuple | None = None
        self._new = new
        if new is not None:   # this process's other calls about the path send it first (Tier.send_unsent)
            tier.unsent.setdefault(path, []).append(self._send_record)
        #: True once :meth:`close` counted this handle out of the file's writers (``close(writer=True)``).
        self.counted_out = False
        self._writer = self.store.writer()
        self.stats = iostats.Recorder()
        #: The write calls not yet counted (see :mod:`mpiburst.iostats`); None when recording is off.
        self._calls: list[int] | None = self.stats.calls
        if not iostats.enabled():
            self._calls = None
            self.read = self._read  # type: ignore[method-assign]

    # -- writes -------------------------------------------------------------
    @property
    def room(self) -> int:
        """Payload bytes one batch carries: the buffer size less :data:`BLOB_SLACK`."""
        return self.limit - BLOB_SLACK if self.limit > 2 * BLOB_SLACK else self.limit

    def write(self, offset: int, data: memoryview) -> None:
        """Buffer ``data`` (a byte memoryview) for file offset ``offset``, counted in :attr:`stats`.

        A full buffer is pushed. A write of at most :data:`MAX_EXTENT` bytes
        always travels in one batch; a larger one fills the batch to the brim
        and continues in the next; one of the buffer's size or more is sent
        from the caller's memory.
        """
        n = len(data)
        if n:
            check_offset(offset + n, f"write {n} bytes at offset {offset} of")
        calls = self._calls
        if calls is not None:  # recording (a refused write is not): two appends, counted in bulk (iostats)
            calls.append(offset)
            calls.append(n)
            if n < _SMALL_WRITE and len(calls) >= _DIGEST_AT:   # larger ones: counted while a batch is sent
                self.stats.digest()
        if n == 0:
            return
        if n >= self.limit:
            if self._extents:
                self.push()
            self._send_direct(offset, data)   # a record not sent yet goes with its first blob
            return
        pos = 0
        while pos < n:
            free = self.room - len(self._payload)
            if free < n - pos and (n <= MAX_EXTENT or free <= 0) and self._payload:
                self.push()
                continue
            take = n - pos if n <= MAX_EXTENT else min(n - pos, max(free, 1))
            self._append(offset + pos, data[pos:pos + take])
            pos += take

    def _append(self, offset: int, data: memoryview) -> None:
        """Copy ``data`` into the buffer and index it, extending the last extent when contiguous.

        A write of the same length as the last one, a fixed stride after it,
        extends it into a strided run (one index entry for records written
        at a regular stride, see :class:`~mpiburst.overlay.Strided`). Only
        the last entry grows, so a later write still gets a later sequence
        number than every block it may overlap.
        """
        n = len(data)
        boff = len(self._payload)
        self._payload += data
        ext = self._extents
        pos = 0
        if ext:
            last = ext[-1]
            if len(last) == 5:
                if n == last[2] and offset == last[0] + last[3] * last[4] and offset + n - last[0] <= MAX_SPAN:
                    last[3] += 1
                    return
            elif last[0] + last[2] == offset and last[2] < MAX_EXTENT:
                pos = min(n, MAX_EXTENT - last[2])
                last[2] += pos
            elif n == last[2] and last[0] + n < offset and offset + n - last[0] <= MAX_SPAN:
                ext[-1] = [last[0], last[1], n, 2, offset - last[0]]
                return
        while pos < n:
            ln = min(MAX_EXTENT, n - pos)
            ext.append([offset + pos, boff + pos, ln])
            pos += ln

    def write_runs(self, offsets: np.ndarray, lengths: np.ndarray, data: memoryview) -> None:
        """Buffer the packed ``data`` for the file runs ``(offsets, lengths)``, in order (later runs win).

        One noncontiguous write. Runs of one length at a fixed stride (a
        vector or subarray view) become strided runs: copied into the buffer
        as a whole, as many blocks per batch as fit, one index entry per
        batch, in one call whatever the number of blocks; such a group counts
        as one write call in :attr:`stats`. Irregular or long runs are
        written (and counted) one by one, as :meth:`write` does.
        """
        if len(offsets) == 0:
            return
        check_offset(int((offsets + lengths).max()), f"write {len(data)} bytes at offset {int(offsets[0])} of")
        at = 0
        for i, j, length, stride in _regular(offsets, lengths):
            if j - i == 1 or length > MAX_EXTENT or stride < length or length > self.room:
                for off, ln in zip(offsets[i:j].tolist(), lengths[i:j].tolist()):
                    self.write(off, data[at:at + ln])
                    at += ln
                continue
            n = (j - i) * length
            calls = self._calls
            if calls is not None:
                calls.append(int(offsets[i]))
                calls.append(n)
                if len(calls) >= _DIGEST_AT:
                    self.stats.digest()
            self._append_strided(int(offsets[i]), data[at:at + n], length, stride)
            at += n

    def _append_strided(self, offset: int, data: memoryview, length: int, stride: int) -> None:
        """Buffer blocks of ``length`` bytes packed in ``data``, ``stride`` apart from ``offset``, batch by batch."""
        count = len(data) // length
        per_span = max(1, (MAX_SPAN - length) // stride + 1)
        k = 0
        while k < count:
            fit = (self.room - len(self._payload)) // length
            if fit <= 0:
                if not self._payload:
                    fit = 1
                else:
                    self.push()
                    continue
            take = min(count - k, fit, per_span)
            off = offset + k * stride
            if take == 1:
                self._append(off, data[k * length:(k + 1) * length])
            else:
                boff = len(self._payload)
                self._payload += data[k * length:(k + take) * length]
                last = self._extents[-1] if self._extents else None
                if (last is not None and len(last) == 5 and last[2] == length and last[4] == stride
                        and off == last[0] + last[3] * stride and last[1] + last[3] * length == boff
                        and off + (take - 1) * stride + length - last[0] <= MAX_SPAN):
                    last[3] += take
                else:
                    self._extents.append([off, boff, length, take, stride])
            k += take

    @property
    def buffered(self) -> int:
        """Bytes waiting in the write-back buffer."""
        return len(self._payload)

    def sync(self) -> None:
        """:meth:`push`, then wait until the writes are as safe as the tier makes them (with replicas: on two nodes)."""
        self.push()
        self.store.confirm()

    def push(self) -> None:
        """Send the buffered writes to the tier and wait until it has them all (and the file's record).

        After ``push`` returns, other processes see the data.
        """
        if self._extents:
            t0 = perf_counter_ns()
            self._send(memoryview(self._payload), self._extents)
            self._payload = bytearray()
            self._extents = []
            self._count_calls()
            self._await()
            self.stats.writes.ns += perf_counter_ns() - t0
        else:
            self._await()
            if self._new is not None:
                self._make_record(writing=True)

    def _make_record(self, writing: bool) -> None:
        """Make the file's record not made yet (``new``), unless it exists; ``writing``: count this handle in."""
        new = self._new
        if new is not None:
            with_room(self.tier, lambda: self.store.create(self.path, None, new.umask, writing=writing, looked=False),
                      f"create {self.path}")
            self._made()

    def _made(self) -> None:
        """The file's record is in the tier now: nothing left to send first."""
        if self._new is not None:
            self._new = None
            sends = self.tier.unsent.get(self.path, [])
            if self._send_record in sends:
                sends.remove(self._send_record)
            if not sends:
                self.tier.unsent.pop(self.path, None)

    def _send_record(self) -> None:
        """Make the record not sent yet, with this handle counted in (as an Open that sent it would have)."""
        self._await()
        self._make_record(writing=True)

    def _count_calls(self) -> None:
        """Count the recorded write calls (:meth:`iostats.Recorder.digest`), if :data:`_COUNT_AT_PUSH` gathered.

        Called while a batch is on its way to the server, before waiting for
        its answer: the count runs while the server stores the batch, and a
        close after a sync has (almost) nothing left to count.
        """
        calls = self._calls
        if calls is not None and len(calls) >= _COUNT_AT_PUSH:
            self.stats.digest()

    def _send_direct(self, offset: int, data: memoryview) -> None:
        """Send a write of the buffer's size or more as blobs of :attr:`room` bytes, no copy.

        The caller's memory is sent as is, so this waits for the tier to
        acknowledge it before returning (the caller may reuse the buffer).
        """
        t0 = perf_counter_ns()
        step = min(self.room, MAX_BLOB)
        for start in range(0, len(data), step):
            piece = data[start:start + step]
            extents = [(offset + start + p, p, min(MAX_EXTENT, len(piece) - p))
                       for p in range(0, len(piece), MAX_EXTENT)]
            self._send(piece, extents)
        self._count_calls()
        self._await()
        self.stats.writes.ns += perf_counter_ns() - t0

    def _send(self, payload: memoryview, extents, closing: bool = False) -> None:
        """Send one batch without waiting for it, after the previous one is acknowledged.

        One batch at most is in flight (a large write's next blob goes out
        while the server stores the previous one). Its payload is kept until
        acknowledged, so a full tier can still be answered by making room and
        sending it again. ``closing``: the batch also counts this handle out
        of the file's writers once stored (:meth:`~mpiburst.store.BatchWriter.send`).
        A record not made yet goes with it.
        """
        self._await()
        try:
            self._writer.send(self.path, self.channel, payload, extents, closing=closing, new=self._new)
        except TierConnectionError as exc:
            raise _lost(exc) from None
        except (TierFullError, RecordGone):   # a store that makes the record first, on a full tier
            self._missed(payload, extents)
            return
        self._inflight = (True, payload, extents, closing)

    def _missed(self, payload: memoryview, extents) -> None:
        """Hold a batch the tier did not store, for :meth:`_commit` (its record made or not, as the writer says)."""
        self._inflight = (False, payload, extents, False)
        if self._writer.made:
            self._made()

    def _await(self) -> None:
        """Wait for the batch in flight, if any; retry it through :meth:`_commit` if it did not land.

        The batch is held until the tier has it: if the retry fails too (a
        full tier), nothing is lost and a later push sends it again.
        """
        if self._inflight is None:
            return
        on_wire, payload, extents, closing = self._inflight
        if on_wire:
            self._inflight = (False, payload, extents, False)  # its replies are read now: no longer on the wire
            try:
                self._writer.finish()
                self._inflight = None
                self._made()
                self.counted_out = self.counted_out or closing
                return
            except (TierFullError, RecordGone):
                self._missed(payload, extents)
            except TierConnectionError as exc:
                raise _lost(exc) from None
        self._make_record(writing=True)   # the record the batch did not make, this handle counted in
        self._commit(payload, extents)
        self._inflight = None

    def _commit(self, payload: memoryview, extents) -> None:
        """Commit one batch and wait; when the tier is full, flush and free data, then retry (:func:`with_room`)."""
        while True:
            try:
                with_room(self.tier, lambda: self.store.commit(self.path, self.channel, payload, extents),
                          f"take {len(payload)} bytes for {self.path}")
                return
            except RecordGone:
                register(self.tier, self.path, create=True, exclusive=False, found=bfs_stat(self.path))
            except TierConnectionError as exc:
                raise _lost(exc) from None

    def close(self, writer: bool = False, confirm: bool = True) -> None:
        """Push what is buffered, add this handle's counters to the tier's and give the connection back.

        The last batch goes out first, the counters behind it on the same
        connection (:meth:`~mpiburst.store.BatchWriter.stats_add`), and both
        answers are read at once: recording adds no round trip to a close;
        that batch's wait is not in the write time.
        ``writer``: this handle is the last of its open counted among the
        file's writers: it is counted out, by the last batch in the same round
        trip (or, without one, by :meth:`~mpiburst.store.Store.writers`), and
        :attr:`counted_out` is then True; else the caller still must. Then the
        confirm covers it too. ``confirm`` False: the caller confirms later
        (after changes of its own).
        """
        try:
            if self._extents:
                t0 = perf_counter_ns()
                self._send(memoryview(self._payload), self._extents, closing=writer)
                self._payload = bytearray()
                self._extents = []
                self.stats.writes.ns += perf_counter_ns() - t0
            elif self._new is not None:   # a new file without a byte: its record alone, this handle not counted
                self._await()
                if self._new is not None:
                    self._make_record(writing=False)
                    self.counted_out = writer
            self.stats.merge(self._writer, self.path)   # with the last batch, in its round trip
            self._await()
            if writer and not self.counted_out:   # no last batch counted it out: every write is in the tier
                self.store.writers(self.path, -1)
                self.counted_out = True
            if confirm:
                self.store.confirm()   # with replicas: on two nodes before the close returns
        finally:
            self._writer.close()
            self._made()   # a record a failed close did not send stays unsent: nothing asks this handle any more

    # -- reads --------------------------------------------------------------
    def meta(self) -> FileMeta | None:
        """Return the tier's record of the file (its BFS size joined, :mod:`mpiburst.lookup`); without one
        (purged), what the BFS file says."""
        if self._new is not None:
            self.push()
        return self._joined(self.store.meta(self.path))

    def _joined(self, meta: FileMeta | None) -> FileMeta | None:
        """Return the tier's record ``meta`` with its BFS size joined; without one (purged), what the BFS file says."""
        return looked(self.store, meta) if meta is not None else _bfs_meta(self.path)

    def size(self) -> int:
        """Return the file's logical size, including this process's buffered writes."""
        self.push()
        meta = self.meta()
        return meta.size if meta else 0

    def read(self, offset: int, out: memoryview) -> int:
        """Fill ``out`` from file offset ``offset`` (see :meth:`_read`), counted in :attr:`stats`."""
        t0 = perf_counter_ns()
        got = self._read(offset, out)
        self.stats.reads.add(offset, got, perf_counter_ns() - t0)
        return got

    def _read(self, offset: int, out: memoryview) -> int:
        """Fill ``out`` from file offset ``offset``; return the bytes read (short at end of file)."""
        self.push()
        for _ in range(_READ_TRIES):
            meta, found = self.store.window(self.path, offset, offset + len(out))
            meta = self._joined(meta)
            if meta is None:
                return 0
            hi = min(offset + len(out), meta.size)
            if hi <= offset:
                return 0
            with BfsBytes(self.path if meta.bfs else None, limit=meta.trunc) as bfs:
                if current_bytes(self.store, self.path, offset, out[:hi - offset], extents=found, bfs=bfs):
                    return hi - offset
            # a purge freed a blob under us: its bytes are on the BFS now, look again
        raise ServerError(f"reading {self.path} kept racing with purges of its data; try again.")

    # -- size ---------------------------------------------------------------
    def set_size(self, size: int) -> None:
        """Set the file's logical size (truncate or extend with zeros)."""
        check_offset(size, f"set the size {size} of")
        self.push()
        meta = self.store.meta(self.path)
        if meta is not None:   # an unlooked record is joined to its BFS size first: it never holds a truncation
            looked(self.store, meta)
        with_room(self.tier, lambda: self.store.set_size(self.path, size), f"set the size of {self.path}")


def _regular(offsets: np.ndarray, lengths: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """Split runs into groups ``(i, j, length, stride)``: runs ``[i, j)`` of one length at one stride.

    A view of a regular pattern is one group (checked with numpy, no Python
    loop over the runs); otherwise groups are found greedily.
    """
    n = len(offsets)
    if n == 1:
        yield 0, 1, int(lengths[0]), 0
        return
    steps = np.diff(offsets)
    if (lengths == lengths[0]).all() and (steps == steps[0]).all():
        yield 0, n, int(lengths[0]), int(steps[0])
        return
    offs, lens = offsets.tolist(), lengths.tolist()
    i = 0
    while i < n:
        j, stride = i + 1, 0
        if j < n and lens[j] == lens[i]:
            stride = offs[j] - offs[i]
            while j < n and lens[j] == lens[i] and offs[j] - offs[j - 1] == stride:
                j += 1
        yield i, j, lens[i], stride
        i = j


def with_room(tier: Tier, action: Callable[[], T], what: str) -> T:
    """Run a store ``action`` that adds to the tier; when the tier is full, flush and free data, then retry.

    Another writer, or the engine, may free the memory first, so a round of
    :func:`~mpiburst.residency.make_room` that freed nothing here is no proof
    that nothing can be freed: the action runs again after a nap of
    :data:`_ROOM_NAP` seconds per such round, and only after
    :data:`_ROOM_TRIES` rounds in a row that neither flushed nor freed
    anything while the tier stayed full does it fail, saying it could not
    ``what``. For the same reason the files still being written are
    published as they are (:func:`~mpiburst.residency.make_room`, when their
    data fills the tier) only from the second such round on.
    """
    stalled = 0
    while True:
        try:
            return action()
        except TierFullError:
            stalled = 0 if make_room(tier, open_files=stalled > 0) else stalled + 1
            if stalled >= _ROOM_TRIES:
                raise TierFullError(
                    f"the tier is full and nothing more can be flushed or freed to {what}; unpin files, "
                    "purge data or restart the run with a larger --capacity.") from None
            if stalled:
                sleep(_ROOM_NAP * stalled)


def check_offset(end: int, what: str) -> None:
    """Refuse a file end past :data:`MAX_OFFSET` with an :class:`OffsetError` (``what`` names the act)."""
    if end > MAX_OFFSET:
        raise OffsetError(f"cannot {what} a tier file: the tier stores files only up to {MAX_OFFSET} bytes "
                          "(2**53 - 256 KiB, 8 PiB); keep offsets below that, or write such a file directly with "
                          "mpi4py.MPI.File.")


def register(tier: Tier, path: str, create: bool, exclusive: bool, found: os.stat_result | None,
             writing: bool = False, look: bool = True) -> str | FileMeta:
    """Make sure the tier knows ``path`` before it is opened; no MPI involved.

    ``found`` is what the BFS holds at ``path`` (:func:`mpiburst.paths.locate`,
    :func:`~mpiburst.paths.bfs_stat`). A create that is not exclusive takes
    one round trip (the store's create-if-absent, which keeps a record
    already there), with ``writing`` also counting the handle as one of the
    file's writers (:meth:`~mpiburst.store.Store.writers`) in that same
    call; the other modes read the record first (and count the writer in a
    second call when the record exists). ``look`` False (a create that is
    not exclusive): the BFS was not looked at, ``found`` means nothing, and
    a new record is made unlooked (:mod:`mpiburst.lookup`).

    Returns
    -------
    str or FileMeta
        ``"exists"`` for an exclusive create of a file that exists (in the
        tier or on the BFS), ``"missing"`` when there is no such file and
        ``create`` is false, else the file's record (registered now if it
        was not: its logical size starts at the BFS file's size, and it
        keeps this process's umask for the flush).
    """
    store = tier.store
    tier.send_unsent(path)   # this process's own open of the new file, not sent yet: the file exists
    bfs_size = found.st_size if found is not None else None
    meta = None if create and not exclusive else store.meta(path)
    exists = meta is not None or bfs_size is not None
    if exists and create and exclusive:
        return "exists"
    if not exists and not create:
        return "missing"
    if meta is None:
        return with_room(tier, lambda: store.create(path, bfs_size, umask=current_umask(), writing=writing,
                                                    looked=look), f"create {path}")
    if writing:
        store.writers(path, 1, 1)
    return meta


def _bfs_meta(path: str) -> FileMeta | None:
    """Describe a file the tier holds nothing of: its BFS copy is all there is (None if none)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    return FileMeta(path=path, size=size, seq=0, clean=0, pending=0, trunc=None, pinned=False, bfs=True)


def _lost(exc: Exception) -> ServerError:
    return TierConnectionError(f"{str(exc).split(';')[0]}; data this process had not yet pushed was not stored: "
                               "check the run with `mpiburst status` and read its server log.")


