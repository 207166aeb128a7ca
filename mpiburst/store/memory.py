"""The tier store in this process's memory: plain Python structures, no server, for fast unit tests.

It implements the same interface, with the same behaviour, as
:class:`~mpiburst.store.redis_store.RedisStore` (the contract suite
:class:`mpiburst.testing.store.StoreTests` checks both), so code above the store
runs its production paths on it. A lock makes each method atomic, as a
script or a transaction is on the server. ``capacity`` bounds the bytes of
committed batches and channel data: past it commits raise
:class:`~mpiburst.errors.TierFullError`, like a server at ``maxmemory``.

It is never a stand-in for the server in a test that claims to test the
server.
"""

from __future__ import annotations

import bisect
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import TierFullError
from ..overlay import Entry, Extent, Strided, expand
from .base import (
    MAX_EXTENT,
    MAX_SPAN,
    BatchWriter,
    Blob,
    ChannelState,
    FileMeta,
    NewFile,
    Payload,
    RecordGone,
    Store,
    blocks,
    file_id,
    index_member,
)

_FULL = ("the tier is full (its memory limit was reached); sync and purge data, "
         "or start the run with a larger --capacity.")


@dataclass
class _File:
    """One file: its record, its index (sorted by offset) and its batches."""

    meta: FileMeta
    staged: int = 0
    index: list[tuple[int, bytes, Extent]] = field(default_factory=list)   # (start, member, extent)
    strided: list[tuple[int, bytes, Strided]] = field(default_factory=list)   # (start, member, run)
    blobs: dict[int, tuple[Blob, bytes]] = field(default_factory=dict)


@dataclass
class _Channel:
    pieces: list[bytes] = field(default_factory=list)
    used: bool = False
    bytes: int = 0
    stores: int = 0
    writer: str | None = None


def _ordered(entries: list[tuple[int, bytes, Any]]) -> list[Any]:
    """Return the entries of ``(start, member, entry)`` items in the index order (:func:`~mpiburst.store.base.index_order`)."""
    return [e for _, _, e in sorted(entries, key=lambda item: item[:2])]


class MemoryStore(Store):
    """A :class:`~mpiburst.store.base.Store` in this process's memory (see the module docstring).

    Parameters
    ----------
    capacity
        Bytes of data the store takes before commits raise ``TierFullError``
        (None: no limit).
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._files: dict[str, _File] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._channels: dict[int, _Channel] = {}
        self._queue: deque[bytes] = deque()
        self._pointers: dict[tuple[str, str], int] = {}
        self._stats: dict[str, dict[str, dict[str, int]]] = {}
        self._log: list[str] = []
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._used = 0

    # -- file records -------------------------------------------------------
    def meta(self, path: str) -> FileMeta | None:
        with self._lock:
            f = self._files.get(path)
            return None if f is None else replace(f.meta)

    def create(self, path: str, bfs_size: int | None, umask: int | None = None,
               writing: bool = False, looked: bool = True) -> FileMeta:
        with self._lock:
            if path not in self._files:
                size = bfs_size or 0 if looked else 0
                meta = FileMeta(path=path, size=size, seq=0, clean=0, pending=0, trunc=None,
                                pinned=False, bfs=looked and bfs_size is not None, umask=umask, unlooked=not looked)
                self._files[path] = _File(meta)
            if writing:
                self.writers(path, 1, 1)   # the lock is reentrant: one atomic step with the create
            return replace(self._files[path].meta)

    def found_on_bfs(self, path: str, bfs_size: int | None) -> FileMeta | None:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return None
            m = f.meta
            if m.unlooked:
                m.unlooked = False
                m.bfs = bfs_size is not None
                if bfs_size is not None:
                    m.size = max(m.size, bfs_size)
                    m.settled_size = max(m.settled_size, bfs_size)
            return replace(m)

    def files(self) -> dict[str, str]:
        with self._lock:
            return {p: file_id(p) for p in self._files}

    def cut(self) -> dict[str, FileMeta]:
        with self._lock:
            return {p: replace(f.meta, pending=0) for p, f in self._files.items()}

    def drop(self, path: str) -> None:
        with self._lock:
            f = self._files.pop(path, None)
            if f is not None:
                self._used -= sum(len(data) for _, data in f.blobs.values())
            self._leases.pop(path, None)
            for key in [k for k in self._pointers if k[0] == path]:
                del self._pointers[key]

    def set_pinned(self, path: str, pinned: bool) -> None:
        with self._lock:
            f = self._files.get(path)
            if f is not None:
                f.meta.pinned = pinned

    def writers(self, path: str, delta: int, settle_at_most: int = -1) -> int:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return -1
            m = f.meta
            m.writers = max(0, m.writers + delta)
            if m.writers <= settle_at_most:
                m.settled, m.settled_size, m.settled_truncs = m.seq, m.size, m.truncs
            return m.writers

    def set_size(self, path: str, size: int) -> int:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return 0
            old = f.meta.size
            kept = []
            for start, member, e in f.index:
                if start >= size:
                    continue
                if e.end > size:
                    e = e._replace(length=size - start)
                    member = index_member(e)
                kept.append((start, member, e))
            runs = []
            for start, member, r in f.strided:
                if start >= size:
                    continue
                if r.end > size:
                    q = max(0, min(r.nblocks, (size - start - r.length) // r.stride + 1))   # whole blocks left
                    if q >= 2:
                        runs.append((start, member, r._replace(nblocks=q)))
                    elif q == 1:
                        e = Extent(r.seq, start, r.length, r.blob, r.boff)
                        kept.append((start, index_member(e), e))
                    at = start + q * r.stride
                    if q < r.nblocks and at < size:
                        e = Extent(r.seq, at, size - at, r.blob, r.boff + q * r.length)
                        kept.append((at, index_member(e), e))
                    continue
                runs.append((start, member, r))
            f.index = sorted(kept)
            f.strided = sorted(runs)
            cut = min(old, size)
            if f.meta.trunc is None or f.meta.trunc > cut:
                f.meta.trunc = cut
            f.meta.size = size
            f.meta.truncs += 1
            return old

    # -- data ---------------------------------------------------------------
    def commit(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
               staged: bool = False) -> int:
        data = bytes(payload)
        with self._lock:
            f = self._files.get(path)
            if f is None:
                raise RecordGone(path)
            if self.capacity is not None and self._used + len(data) > self.capacity:
                raise TierFullError(_FULL)
            n = len(extents)
            if staged:
                base = last = 0
                f.staged += 1
                blob = -f.staged
            else:
                f.meta.seq += n
                last = f.meta.seq
                base = blob = last - n + 1
            end = 0
            for i, x in enumerate(extents):
                seq = base + i if base > 0 else 0
                if len(x) > 3 and x[3] > 1:
                    r = Strided(seq, x[0], x[2], blob, x[1], x[3], x[4])
                    bisect.insort(f.strided, (r.start, index_member(r), r))
                    end = max(end, r.end)
                else:
                    e = Extent(seq, x[0], x[2], blob, x[1])
                    bisect.insort(f.index, (e.start, index_member(e), e))
                    end = max(end, e.end)
            f.blobs[blob] = (Blob(blob, last, n, len(data), channel), data)
            self._used += len(data)
            f.meta.size = max(f.meta.size, end)
            return base

    def writer(self) -> BatchWriter:
        return MemoryBatchWriter(self)

    def extents(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Extent]:
        return blocks(self.index(path, lo, hi, upto), lo, hi)

    def index(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Entry]:
        top = float("inf") if upto is None else upto
        return [e for e in self._overlapping(path, lo, hi) if e.seq <= top]

    def _overlapping(self, path: str, lo: int, hi: int) -> list[Entry]:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return []
            out: list[tuple[int, bytes, Entry]] = []
            for entries, slack in ((f.index, MAX_EXTENT), (f.strided, MAX_SPAN)):
                first = bisect.bisect_right(entries, (lo - slack, b"\xff"))
                for item in entries[first:]:
                    if item[0] >= hi:
                        break
                    if item[2].end > lo:
                        out.append(item)
            return _ordered(out)

    def window(self, path: str, lo: int, hi: int) -> tuple[FileMeta | None, list[Extent]]:
        with self._lock:
            meta = self.meta(path)
            return (None, []) if meta is None else (meta, blocks(self._overlapping(path, lo, hi), lo, hi))

    def extents_from(self, path: str, start: int, count: int) -> list[Entry]:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return []
            found: list[tuple[int, bytes, Entry]] = []
            for entries in (f.index, f.strided):
                first = bisect.bisect_left(entries, (start, b""))
                found += entries[first:first + count]
            return _ordered(found)[:count]

    def all_extents(self, path: str) -> Iterator[Extent]:
        with self._lock:
            f = self._files.get(path)
            found = [] if f is None else [e for _, _, e in f.index]
            runs = [] if f is None else [r for _, _, r in f.strided]
        if runs:
            found = _ordered([(e.start, index_member(e), e) for e in [*found, *expand(runs)]])
        yield from found

    def fetch_into(self, path: str, extents: Iterable[Entry], lo: int, out: memoryview) -> bool:
        hi = lo + len(out)
        complete = True
        with self._lock:
            f = self._files.get(path)
            for e in sorted(expand(extents, lo, hi), key=lambda e: e.seq):   # newest last: it wins
                a, b = max(lo, e.start), min(hi, e.end)
                if a >= b:
                    continue
                held = None if f is None else f.blobs.get(e.blob)
                if held is None:
                    complete = False
                    continue
                data = held[1]
                src = e.boff + a - e.start
                out[a - lo:b - lo] = data[src:src + b - a]
        return complete

    def blobs(self, path: str, lo_seq: float = 0, hi_seq: float = float("inf")) -> list[Blob]:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return []
            found = [b for b, _ in f.blobs.values() if lo_seq <= b.last <= hi_seq]
        return sorted(found, key=lambda b: (b.last, f"{b.blob}:{b.extents}:{b.bytes}:{b.channel}"))

    def drop_clean(self, path: str) -> int:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return 0
            gone = {b.blob for b, _ in f.blobs.values() if 0 <= b.last <= f.meta.clean}
            if not gone:
                return 0
            f.index = [item for item in f.index if item[2].blob not in gone]
            f.strided = [item for item in f.strided if item[2].blob not in gone]
            freed = sum(f.blobs.pop(blob)[0].bytes for blob in gone)
            self._used -= freed
            return freed

    # -- the flush lease ----------------------------------------------------
    def _holder(self, path: str) -> str | None:
        held = self._leases.get(path)
        if held is None:
            return None
        if held[1] <= time.monotonic():
            del self._leases[path]
            return None
        return held[0]

    def lease(self, path: str, seconds: float) -> str | None:
        with self._lock:
            if self._holder(path) is not None:
                return None
            token = secrets.token_hex(8)
            self._leases[path] = (token, time.monotonic() + seconds)
            return token

    def renew(self, path: str, token: str, seconds: float) -> bool:
        with self._lock:
            if self._holder(path) != token:
                return False
            self._leases[path] = (token, time.monotonic() + seconds)
            return True

    def begin(self, path: str) -> FileMeta:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                return FileMeta(path="", size=0, seq=0, clean=0, pending=0, trunc=None, pinned=False, bfs=False)
            f.meta.pending = f.meta.seq
            return replace(f.meta)

    def mark_clean(self, path: str, token: str, upto: int, trunc: int | None) -> bool:
        with self._lock:
            if self._holder(path) != token:
                return False
            del self._leases[path]
            f = self._files.get(path)
            if f is not None:
                f.meta.clean = max(f.meta.clean, upto)
                if trunc is not None and f.meta.trunc == trunc:
                    f.meta.trunc = None
                f.meta.bfs = True
                f.meta.unlooked = False
                f.meta.pending = 0
            return True

    def release(self, path: str, token: str) -> None:
        with self._lock:
            if self._holder(path) == token:
                del self._leases[path]
                f = self._files.get(path)
                if f is not None:
                    f.meta.pending = 0

    def leased(self, path: str) -> bool:
        with self._lock:
            return self._holder(path) is not None

    # -- channels -----------------------------------------------------------
    def _channel(self, channel: int) -> _Channel:
        return self._channels.setdefault(channel, _Channel())

    def channel_open(self, channel: int) -> str | None:
        with self._lock:
            c = self._channel(channel)
            if c.writer is not None:
                return None
            c.writer = secrets.token_hex(8)
            return c.writer

    def channel_append(self, channel: int, pieces: Sequence[bytes], stored: bool = False) -> None:
        with self._lock:
            c = self._channel(channel)
            for piece in pieces:
                if self.capacity is not None and self._used + len(piece) > self.capacity:
                    raise TierFullError(_FULL)
                c.pieces.append(bytes(piece))
                c.bytes += len(piece)
                c.used = True
                self._used += len(piece)
            if stored:
                c.stores += 1
                c.used = True

    def channel_close(self, channel: int, token: str) -> None:
        with self._lock:
            c = self._channel(channel)
            if c.writer == token:
                c.writer = None

    def channel_states(self, channels: Sequence[int]) -> list[ChannelState]:
        with self._lock:
            out = []
            for n in channels:
                c = self._channels.get(n) or _Channel()
                out.append(ChannelState(c.writer is not None, c.bytes, c.stores))
            return out

    def channel_read(self, channel: int, start: int, count: int) -> list[bytes]:
        with self._lock:
            c = self._channels.get(channel)
            return [] if c is None else c.pieces[start:start + count]

    def channel_reset(self, channels: Sequence[int]) -> list[bool]:
        with self._lock:
            out = []
            for n in channels:
                c = self._channels.get(n)
                out.append(c is not None and c.writer is not None)
                if c is not None:
                    c.writer = None
            return out

    # -- request queue ------------------------------------------------------
    def enqueue(self, request: bytes) -> None:
        with self._arrived:
            self._queue.append(bytes(request))
            self._arrived.notify_all()

    def dequeue(self, timeout: float = 0.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)
            return self._queue.popleft()

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- shared file pointers -----------------------------------------------
    def shared_pointer(self, path: str, token: str, delta: int = 0) -> int:
        with self._lock:
            before = self._pointers.get((path, token), 0)
            self._pointers[(path, token)] = before + delta
            return before

    def set_shared_pointer(self, path: str, token: str, value: int) -> None:
        with self._lock:
            self._pointers[(path, token)] = value

    def drop_shared_pointer(self, path: str, token: str) -> None:
        with self._lock:
            self._pointers.pop((path, token), None)

    # -- I/O statistics -----------------------------------------------------
    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        with self._lock:
            mine = self._stats.setdefault(path, {}).setdefault(who, {})
            for name, value in counters.items():
                mine[name] = mine.get(name, 0) + int(value)

    def stats_log(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            self._log.append(json.dumps(event))   # as the server keeps it: later changes to event do not show

    def stats(self) -> tuple[dict[str, dict[str, dict[str, int]]], list[dict[str, Any]]]:
        with self._lock:
            counters = {p: {w: dict(c) for w, c in by.items()} for p, by in self._stats.items()}
            return counters, [json.loads(e) for e in self._log]

    # -- the whole store ----------------------------------------------------
    def memory(self) -> tuple[int, int]:
        with self._lock:
            return self._used, self.capacity or 0

    def traffic(self) -> tuple[int, int] | None:
        """None: no server carries this store's data."""
        return None

    def empty(self) -> bool:
        with self._lock:
            return not self._files and not self._queue and not self._pointers and not any(
                c.used or c.writer is not None for c in self._channels.values())

    def commit_leaving(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]]) -> int:
        """:meth:`commit`, then one writer less, in one step, as the server's script does for a closing batch."""
        with self._lock:
            base = self.commit(path, channel, payload, extents)
            self.writers(path, -1)
            return base

    def close(self) -> None:
        """Nothing to close: the data stays for other users of this store."""


class MemoryBatchWriter(BatchWriter):
    """Pipelined commits on the memory store: the batch is stored when its answer is asked for."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._batch: tuple[str, int, Payload, Sequence[Sequence[int]]] | None = None
        self._closing = False
        self._new: NewFile | None = None

    def send(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
             closing: bool = False, new: NewFile | None = None) -> None:
        self._batch = (path, channel, payload, extents)
        self._closing = closing
        self._new = new

    def finish(self) -> int:
        batch, self._batch = self._batch, None
        if batch is None:
            raise RuntimeError("finish() without a batch in flight")
        self.made = False
        if self._new is not None:
            self.store.create(batch[0], None, self._new.umask, writing=True, looked=False)
            self.made = True
        return self.store.commit_leaving(*batch) if self._closing else self.store.commit(*batch)

    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        self.store.stats_add(path, who, counters)

    def close(self) -> None:
        self._batch = None
