"""The tier store over a real Redis or Valkey server: plain keys, small Lua scripts, raw RESP for bulk bytes.

The keys, scripts and the decoding of replies are :mod:`mpiburst.store.schema`'s
(drawn there). Every name starts with the store's prefix, ``mpb:`` here; a
shard of a cluster store (:mod:`mpiburst.store.cluster_store`) uses
``mpb:{<node tag>}:`` instead, so all of its keys hash to one slot of its own
server.

Every extent is at most :data:`~mpiburst.store.base.MAX_EXTENT` bytes long, so
the extents that overlap ``[a, b)`` are exactly those with
``a - MAX_EXTENT < start < b`` and one ``ZRANGEBYSCORE`` finds them without
scanning the file.

A batch is committed in one round trip: ``SET`` of the payload under a
temporary key, then the commit script, which takes the batch's sequence
numbers from the file's counter, renames the payload to its blob key and
indexes its extents. The payload never passes through Lua (that cost 30-45 %,
see docs/architecture.md), and is sent from the caller's memory as RESP frames
(:mod:`mpiburst.store.resp`); fetches land straight in the destination buffer.

Only this module and the cluster store know redis-py: every public method
turns the server's exceptions into :mod:`mpiburst.errors` ones
(:mod:`mpiburst.store.redis_errors`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import redis

from ..buffers import borrowed
from ..overlay import Entry, Extent, Strided, expand, overlapping
from . import schema
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
    StaleNumbers,
    Store,
    blocks,
    file_id,
    index_order,
)
from .connections import Sockets, borrow
from .redis_errors import public_methods_translated
from .resp import read_bulks_into, resp_frames

#: Pieces shorter than this are fetched together with their neighbours in the blob.
_SMALL_PIECE = 64 << 10
#: Largest unwanted stretch of a blob read to fetch two small pieces with one ``GETRANGE``.
_MERGE_GAP = 64 << 10
#: Largest read that gathers small pieces.
_MERGE_SPAN = 1 << 20
#: The key prefix of a single-server run.
PREFIX = schema.PREFIX
#: Files per pipeline of a call on many files (a commit's leases, clean marks, log entries): one round trip each.
PIPELINE_CHUNK = 1024

# redis-py types a reply as ``bytes | str`` (its types cannot tell ``decode_responses``); the
# clients here never decode, so the replies marked ``# bytes`` are cast to bytes (no runtime cost).


@public_methods_translated
class RedisStore(Store):
    """The tier store on a Redis or Valkey server (see the module docstring).

    Parameters
    ----------
    client
        A redis-py client connected as the run's ordinary user (RESP2 or RESP3).
    prefix
        Put before every key name (default ``mpb:``). A shard of a cluster
        store gives ``mpb:{tag}:`` with a hash tag of a slot its server owns:
        the first ``{...}`` of a key is then the tag, so all its keys live on
        that server (see :mod:`mpiburst.store.cluster_store`).
    """

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self.r = client
        self.prefix = prefix
        #: Every key name of this store (:class:`~mpiburst.store.schema.Keys`).
        self.keys = schema.Keys(prefix)
        self._sockets = Sockets(client)   # the fetches' own (mpiburst.store.connections)
        self._commit = client.register_script(schema.COMMIT)
        self._truncate = client.register_script(schema.TRUNCATE)
        # The flush's bookkeeping must run when the tier is full (it is what makes room).
        oom = schema.ALLOW_OOM
        self._lease = client.register_script(oom + schema.LEASE)
        self._renew = client.register_script(oom + schema.RENEW)
        self._begin = client.register_script(oom + schema.BEGIN)
        self._mark_clean = client.register_script(oom + schema.MARK_CLEAN)
        self._lease_begin = client.register_script(oom + schema.LEASE_BEGIN)
        self._release = client.register_script(oom + schema.RELEASE)
        self._channel_close = client.register_script(oom + schema.CHANNEL_CLOSE)
        self._cut = client.register_script(schema.CUT)
        self._found = client.register_script(oom + schema.FOUND_ON_BFS)
        self._drop = client.register_script(oom + schema.DROP)   # a drop frees memory: also on a full tier
        self._writers = client.register_script(oom + schema.WRITERS)
        self._create = client.register_script(schema.CREATE)
        self._stats_add = client.register_script(oom + schema.STATS_ADD)   # a close on a full tier
        self._stats_push = client.register_script(oom + schema.STATS_LOG_PUSH)
        self._loaded = False

    # -- file records -------------------------------------------------------
    def meta(self, path: str) -> FileMeta | None:
        raw = self.r.hgetall(self.keys.file(file_id(path), "m"))
        if not raw:
            return None
        return schema.meta_from(raw)

    def create(self, path: str, bfs_size: int | None, umask: int | None = None,
               writing: bool = False, looked: bool = True) -> FileMeta:
        raw = self._evalsha(self._create, *self._create_keys_args(path, bfs_size, umask, writing, looked))
        return schema.meta_from(dict(zip(raw[::2], raw[1::2])))

    def _create_keys_args(self, path: str, bfs_size: int | None, umask: int | None, writing: bool,
                          looked: bool) -> tuple[list, list]:
        """Return the KEYS and ARGV of :data:`~mpiburst.store.schema.CREATE` (see :meth:`create`)."""
        fid = file_id(path)
        fields: list[str | int] = ["path", path, "size", bfs_size or 0 if looked else 0, "seq", 0, "clean", 0,
                                   "bfs", schema.UNLOOKED if not looked else 1 if bfs_size is not None else 0]
        if umask is not None:
            fields += ["umask", umask]
        return [self.keys.file(fid, "m"), self.keys.files], [int(writing), 1, fid, *fields]

    def _evalsha(self, script: Any, keys: list, args: list) -> Any:
        """Run a registered ``script`` on a pooled connection, packed by :func:`~mpiburst.store.resp.resp_frames`.

        redis-py's command path (its encoder, retry wrapper and timing
        hooks) costs about 15 us of CPU per call more; a new small file's
        create pays it once per file (#25). A server that lost its scripts
        (NOSCRIPT) runs it through redis-py's script object, which loads it.
        """
        pool = self.r.connection_pool
        conn = borrow(pool)
        try:
            conn.send_packed_command(resp_frames([("EVALSHA", script.sha, len(keys), *keys, *args)]),
                                     check_health=False)
            return conn.read_response()
        except redis.exceptions.NoScriptError:
            pass
        except BaseException:
            conn.disconnect()   # the exchange stopped half-way: what the stream holds is unknown
            raise
        finally:
            pool.release(conn)
        return script(keys=keys, args=args)

    def found_on_bfs(self, path: str, bfs_size: int | None) -> FileMeta | None:
        raw = self._found(keys=[self.keys.file(file_id(path), "m")], args=["" if bfs_size is None else bfs_size])
        return schema.meta_from(dict(zip(raw[::2], raw[1::2]))) if raw else None

    def files(self) -> dict[str, str]:
        registry = cast("dict[bytes, bytes]", self.r.hgetall(self.keys.files))   # bytes
        return {p.decode(): f.decode() for f, p in registry.items()}

    def cut(self) -> dict[str, FileMeta]:
        out = {}
        for flat in self._cut(keys=[self.keys.files], args=[self.prefix]):
            meta = schema.meta_from(dict(zip(flat[::2], flat[1::2])))
            meta.pending = 0
            out[meta.path] = meta
        return out

    def drop(self, path: str) -> None:
        fid = file_id(path)
        keys = [self.keys.file(fid, part) for part in ("B", "m", "x", "v", "lock", "p")]
        self._drop(keys=[*keys, self.keys.files], args=[self.keys.file(fid, "b:"), fid])

    def set_pinned(self, path: str, pinned: bool) -> None:
        mkey = self.keys.file(file_id(path), "m")
        if pinned:
            self.r.hset(mkey, "pinned", 1)
        else:
            self.r.hdel(mkey, "pinned")

    def writers(self, path: str, delta: int, settle_at_most: int = -1) -> int:
        return int(self._writers(keys=[self.keys.file(file_id(path), "m")], args=[delta, settle_at_most]))

    def set_size(self, path: str, size: int) -> int:
        return int(self.clip(path, size))

    def clip(self, path: str, size: int, pipe: Any = None) -> Any:
        """Clip the index of ``path`` at ``size`` and set the record's size; return the old size.

        With ``pipe`` (a pipeline of this store's client), the clip is only
        queued on it (a cluster shard fences and clips at one instant).
        """
        keys = self.keys.truncation(file_id(path))
        return self._truncate(keys=keys, args=[size, MAX_EXTENT, MAX_SPAN], client=self.r if pipe is None else pipe)

    # -- data ---------------------------------------------------------------
    def commit(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
               staged: bool = False) -> int:
        tmp, commands = self._pack_commit(path, channel, payload, extents, staged)
        self._ensure_loaded()
        pipe = self.r.pipeline(transaction=False)
        pipe.execute_command("SET", tmp, bytes(payload))  # redis-py with hiredis takes no memoryview
        pipe.execute_command(*commands[1])
        return self._commit_result(tmp, pipe.execute(raise_on_error=False))

    def writer(self) -> BatchWriter:
        return RedisBatchWriter(self)

    def _pack_commit(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
                     staged: bool = False, closing: bool = False, new: NewFile | None = None
                     ) -> tuple[str, list[tuple]]:
        """Return the temporary key and the commands that commit one batch (see :meth:`commit`).

        Two commands; with ``new``, the create of the file's record first
        (:meth:`BatchWriter.send`): three.
        """
        tmp = self.keys.temporary(path)
        keys, args = schema.commit_keys_args(self.keys, path, tmp, channel, len(payload), extents, staged, None,
                                             closing)
        commands = [("SET", tmp, payload), ("EVALSHA", self._commit.sha, len(keys), *keys, *args)]
        if new is not None:
            ckeys, cargs = self._create_keys_args(path, None, new.umask, True, False)
            commands.insert(0, ("EVALSHA", self._create.sha, len(ckeys), *ckeys, *cargs))
        return tmp, commands

    def index_sent(self, path: str, tmp: str, channel: int, nbytes: int, extents: Sequence[Sequence[int]],
                   staged: bool, base: int | None) -> None:
        """Index a batch whose payload is already at ``tmp``, numbered ``base`` elsewhere (a cluster shard).

        Runs the commit script with the batch's first sequence number
        ``base`` taken from a cluster's global counter (None for a staged
        batch); the payload stays at ``tmp`` when it raises.

        Raises
        ------
        RecordGone
            If this server has no record of the file yet (create it and try again).
        StaleNumbers
            If ``base`` is not above the record's fence (number the batch anew).
        """
        keys, args = schema.commit_keys_args(self.keys, path, tmp, channel, nbytes, extents, staged, base)
        for _ in range(2):
            self._ensure_loaded()
            try:
                self.r.execute_command("EVALSHA", self._commit.sha, len(keys), *keys, *args)
                return
            except redis.exceptions.NoScriptError:
                self._loaded = False   # the server lost its script cache (restarted): load it and try again
            except redis.ResponseError as exc:
                if str(exc).startswith("NOFILE"):
                    raise RecordGone(path) from None
                if str(exc).startswith("STALE"):
                    raise StaleNumbers(path) from None
                raise
        raise RecordGone(path)

    def _ensure_loaded(self) -> None:
        """Load the scripts a batch writer sends by their SHA (the commit, a new file's create, a close's counters)."""
        if not self._loaded:
            self.r.script_load(schema.COMMIT)
            self.r.script_load(schema.CREATE)
            self.r.script_load(self._stats_add.script)
            self._loaded = True

    def _commit_result(self, tmp: str, replies: list) -> int:
        """Return the first sequence number of a batch from the replies of :meth:`_pack_commit`'s commands."""
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            return int(replies[-1])
        self.r.unlink(tmp)
        if any(str(e).startswith("NOFILE") for e in errors):
            raise RecordGone(tmp)
        if any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
            self._loaded = False  # the server lost its script cache (restarted): load and retry
            raise RecordGone(tmp)
        raise errors[0]

    def extents(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Extent]:
        return blocks(self.index(path, lo, hi, upto), lo, hi)

    def index(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Entry]:
        return self.index_many([(path, lo, hi, upto)])[0]

    def index_many(self, windows: Sequence[tuple[str, int, int, int | None]]) -> list[list[Entry]]:
        """The two index queries of every window, in pipelines of :data:`PIPELINE_CHUNK` windows."""
        out: list[list[Entry]] = []
        for i in range(0, len(windows), PIPELINE_CHUNK):
            part = windows[i:i + PIPELINE_CHUNK]
            pipe = self.r.pipeline(transaction=False)
            for path, lo, hi, _ in part:
                self._query(pipe, file_id(path), lo, hi)
            replies = pipe.execute()
            for (_, lo, _, upto), raw, rawv in zip(part, replies[::2], replies[1::2]):
                top = float("inf") if upto is None else upto
                out.append([e for e in schema.entries(raw, rawv) if e.end > lo and e.seq <= top])
        return out

    def extents_from(self, path: str, start: int, count: int) -> list[Entry]:
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        for part in ("x", "v"):
            pipe.execute_command("ZRANGEBYSCORE", self.keys.file(fid, part), start, "+inf", "WITHSCORES", "LIMIT", 0, count)
        raw, rawv = pipe.execute()
        return schema.entries(raw, rawv)[:count]

    def window(self, path: str, lo: int, hi: int) -> tuple[FileMeta | None, list[Extent]]:
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.keys.file(fid, "m"))
        self._query(pipe, fid, lo, hi)
        raw_meta, raw, rawv = pipe.execute()
        if not raw_meta:
            return None, []
        return schema.meta_from(raw_meta), blocks([e for e in schema.entries(raw, rawv) if e.end > lo], lo, hi)

    def all_extents(self, path: str, batch: int = 10000) -> Iterator[Extent]:
        key = self.keys.file(file_id(path), "x")
        strided = schema.entries([], self.r.execute_command("ZRANGE", self.keys.file(file_id(path), "v"), 0, -1, "WITHSCORES"))
        if strided:   # few entries, many blocks: merged into the offset order of the plain ones
            plain: list[Extent] = []
            for page in self._pages(key, batch):
                plain += page
            yield from sorted(plain + expand(strided), key=index_order)
            return
        for page in self._pages(key, batch):
            yield from page

    def _query(self, pipe: Any, fid: str, lo: int, hi: int) -> None:
        """Queue the two index queries (plain, strided) that find every entry that may overlap ``[lo, hi)``."""
        pipe.execute_command("ZRANGEBYSCORE", self.keys.file(fid, "x"), f"({lo - MAX_EXTENT}", f"({hi}", "WITHSCORES")
        pipe.execute_command("ZRANGEBYSCORE", self.keys.file(fid, "v"), f"({lo - MAX_SPAN}", f"({hi}", "WITHSCORES")

    def _pages(self, key: str, batch: int) -> Iterator[list[Extent]]:
        """Yield the plain index ``key`` in pages of ``batch`` extents, in offset order."""
        start = 0
        while True:
            found = list(schema.parse_extents(self.r.execute_command("ZRANGE", key, start, start + batch - 1,
                                                               "WITHSCORES")))
            yield found
            if len(found) < batch:
                return
            start += batch

    def fetch_into(self, path: str, extents: Iterable[Entry], lo: int, out: memoryview) -> bool:
        """Paint ``extents`` into ``out`` (see :meth:`Store.fetch_into`), received in place.

        The reads go out as one pipeline of ``GETRANGE``: a large piece is
        received straight into ``out``; small pieces lying close together in
        one blob (a batch of small records) share one read into a scratch
        buffer and are copied out from there. When pieces overlap in the
        file, each is read on its own, in sequence order, so the newest write
        wins byte for byte. A strided run's blocks in the window are one read
        (they are packed in the blob) scattered into ``out`` by numpy.
        """
        hi = lo + len(out)
        entries = list(extents)
        if any(isinstance(e, Strided) for e in entries):
            return self._fetch_mixed(path, entries, lo, out)
        pieces = [e if lo <= e.start and e.start + e.length <= hi else _clip(e, lo, hi)
                  for e in entries if isinstance(e, Extent) and e.start < hi and e.start + e.length > lo]
        if not pieces:
            return True
        if overlapping(pieces):
            reads: list[tuple[Extent, list[Extent]]] = [(e, [e]) for e in sorted(pieces, key=lambda e: e.seq)]
        else:
            reads = coalesce(pieces)
        with borrowed(sum(span.length for span, group in reads if len(group) > 1)) as scratch:
            return self._read_into(path, reads, lo, out, scratch)

    def _fetch_mixed(self, path: str, entries: list[Entry], lo: int, out: memoryview) -> bool:
        """:meth:`fetch_into` with strided runs: every read lands in scratch, then all paint in sequence order."""
        hi = lo + len(out)
        plain = [_clip(e, lo, hi) for e in entries
                 if not isinstance(e, Strided) and e.start < hi and e.start + e.length > lo]
        runs = []
        for e in entries:
            if isinstance(e, Strided):
                i, j = e.span(lo, hi)
                if i < j:
                    runs.append((e, i, j))
        reads = coalesce(plain) if plain else []
        spans = [span for span, _ in reads] + [Extent(e.seq, e.start, (j - i) * e.length, e.blob, e.boff + i * e.length)
                                               for e, i, j in runs]
        with borrowed(sum(span.length for span in spans)) as scratch:
            views, used = [], 0
            for span in spans:
                views.append(scratch[used:used + span.length])
                used += span.length
            if not self._receive(path, spans, views):
                return False
            paint: list[tuple[int, Any]] = []
            for (span, group), view in zip(reads, views):
                for e in group:
                    paint.append((e.seq, (e, view[e.boff - span.boff:e.boff - span.boff + e.length])))
            for (e, i, j), view in zip(runs, views[len(reads):]):
                paint.append((e.seq, (e, i, j, view)))
            target = np.frombuffer(out, dtype=np.uint8)
            for _, item in sorted(paint, key=lambda p: p[0]):   # newest last: it wins
                if len(item) == 2:
                    e, data = item
                    out[e.start - lo:e.end - lo] = data
                else:
                    _scatter(target, lo, *item)
        return True

    def _receive(self, path: str, spans: Sequence[Extent], views: Sequence[memoryview]) -> bool:
        """Read each span's blob bytes into its view, in one pipeline; False if a blob was gone (or short)."""
        key = self.keys.file(file_id(path), "b:")
        commands = [("GETRANGE", f"{key}{span.blob}", span.boff, span.boff + span.length - 1) for span in spans]
        with self._sockets.lend() as sock:   # closed, not reused, if the exchange fails half-way
            for frame in resp_frames(commands):
                sock.sendall(frame)
            lengths = read_bulks_into(sock, list(views))
        return all(n == span.length for n, span in zip(lengths, spans))

    def _read_into(self, path: str, reads: list[tuple[Extent, list[Extent]]], lo: int, out: memoryview,
                   scratch: memoryview) -> bool:
        """Send the planned ``reads`` on a connection of the pool and land their bytes in ``out``."""
        views, used = [], 0
        for span, group in reads:
            if len(group) == 1:
                views.append(out[span.start - lo:span.end - lo])
            else:
                views.append(scratch[used:used + span.length])
                used += span.length
        if not self._receive(path, [span for span, _ in reads], views):
            return False
        for (span, group), view in zip(reads, views):
            if len(group) > 1:
                for e in group:
                    out[e.start - lo:e.end - lo] = view[e.boff - span.boff:e.boff - span.boff + e.length]
        return True

    def blobs(self, path: str, lo_seq: float = 0, hi_seq: float = float("inf")) -> list[Blob]:
        raw = cast("list[tuple[bytes, float]]",   # bytes
                   self.r.zrangebyscore(self.keys.file(file_id(path), "B"), lo_seq,
                                        "+inf" if hi_seq == float("inf") else hi_seq, withscores=True))
        return [schema.parse_blob(member, score) for member, score in raw]

    def drop_clean(self, path: str) -> int:
        meta = self.meta(path)
        if meta is None:
            return 0
        return self.free_clean(path, meta.clean)

    def free_clean(self, path: str, clean: int) -> int:
        """Free the batches of ``path`` whose last sequence number is at most ``clean``; return the bytes freed."""
        fid = file_id(path)
        clean_blobs = self.blobs(path, 0, clean)
        if not clean_blobs:
            return 0
        gone = {b.blob for b in clean_blobs}
        xkey = self.keys.file(fid, "x")
        pipe = self.r.pipeline(transaction=False)
        members = []
        for member in self.r.zscan_iter(xkey, count=5000):
            name = member[0]
            if schema.blob_of(name) in gone:
                members.append(name)
                if len(members) >= schema.ZADD_CHUNK:
                    pipe.zrem(xkey, *members)
                    members = []
        if members:
            pipe.zrem(xkey, *members)
        vkey = self.keys.file(fid, "v")
        held = cast("list[tuple[bytes, float]]", self.r.zrange(vkey, 0, -1, withscores=True))   # bytes
        runs = [m for m, _ in held if schema.blob_of(m, strided=True) in gone]
        for i in range(0, len(runs), schema.ZADD_CHUNK):
            pipe.zrem(vkey, *runs[i:i + schema.ZADD_CHUNK])
        for b in clean_blobs:
            pipe.unlink(self.keys.file(fid, f"b:{b.blob}"))
            pipe.zrem(self.keys.file(fid, "B"), schema.blob_member(b))
        pipe.execute()
        return sum(b.bytes for b in clean_blobs)

    # -- the flush lease ----------------------------------------------------
    def lease(self, path: str, seconds: float) -> str | None:
        token = secrets.token_hex(8)
        ok = self._lease(keys=[self.keys.file(file_id(path), "lock")], args=[token, max(1, int(seconds * 1000))])
        return token if ok else None

    def renew(self, path: str, token: str, seconds: float) -> bool:
        return bool(self._renew(keys=[self.keys.file(file_id(path), "lock")], args=[token, max(1, int(seconds * 1000))]))

    def begin(self, path: str) -> FileMeta:
        return _record_of(self._begin(keys=[self.keys.file(file_id(path), "m")]))

    def lease_and_begin(self, paths: Sequence[str], seconds: float) -> list[tuple[str, FileMeta] | None]:
        """One pipeline of :data:`~mpiburst.store.schema.LEASE_BEGIN` per :data:`PIPELINE_CHUNK` files."""
        tokens = [secrets.token_hex(8) for _ in paths]
        ms = max(1, int(seconds * 1000))
        replies = self._pipelined([(self._lease_begin, [self.keys.file(fid, "m"), self.keys.file(fid, "lock")],
                                    [token, ms]) for fid, token in zip(map(file_id, paths), tokens)])
        return [None if reply == 0 else (token, _record_of(reply)) for token, reply in zip(tokens, replies)]

    def renew_many(self, leases: Sequence[tuple[str, str]], seconds: float) -> list[bool]:
        """One pipeline of :data:`~mpiburst.store.schema.RENEW` per :data:`PIPELINE_CHUNK` leases."""
        ms = max(1, int(seconds * 1000))
        return [bool(ok) for ok in self._pipelined([(self._renew, [self.keys.file(file_id(path), "lock")], [token, ms])
                                                    for path, token in leases])]

    def mark_clean_many(self, flushes: Sequence[tuple[str, str, int, int | None]]) -> list[bool]:
        """One pipeline of :data:`~mpiburst.store.schema.MARK_CLEAN` per :data:`PIPELINE_CHUNK` files."""
        calls = []
        for path, token, upto, trunc in flushes:
            fid = file_id(path)
            calls.append((self._mark_clean, [self.keys.file(fid, "m"), self.keys.file(fid, "lock")],
                          [token, upto, "" if trunc is None else trunc]))
        return [bool(done) for done in self._pipelined(calls)]

    def _pipelined(self, calls: Sequence[tuple[Any, list, list]]) -> list:
        """Run registered scripts (script, keys, args) in pipelines of :data:`PIPELINE_CHUNK`; return their replies.

        Not a transaction: each script is atomic on its own. redis-py loads
        a script the server lacks before the pipeline is sent.
        """
        replies: list = []
        for i in range(0, len(calls), PIPELINE_CHUNK):
            pipe = self.r.pipeline(transaction=False)
            for script, keys, args in calls[i:i + PIPELINE_CHUNK]:
                script(keys=keys, args=args, client=pipe)
            replies += pipe.execute()
        return replies

    def mark_clean(self, path: str, token: str, upto: int, trunc: int | None) -> bool:
        fid = file_id(path)
        done = self._mark_clean(keys=[self.keys.file(fid, "m"), self.keys.file(fid, "lock")],
                                args=[token, upto, "" if trunc is None else trunc])
        return bool(done)

    def release(self, path: str, token: str) -> None:
        fid = file_id(path)
        self._release(keys=[self.keys.file(fid, "m"), self.keys.file(fid, "lock")], args=[token])

    def leased(self, path: str) -> bool:
        return self.r.exists(self.keys.file(file_id(path), "lock")) == 1

    # -- channels -----------------------------------------------------------
    def channel_open(self, channel: int) -> str | None:
        token = secrets.token_hex(8)
        return token if self.r.set(self.keys.channel(channel, "w"), token, nx=True) else None

    def channel_append(self, channel: int, pieces: Sequence[bytes], stored: bool = False) -> None:
        pipe = self.r.pipeline(transaction=False)
        for piece in pieces:
            pipe.rpush(self.keys.channel(channel, "d"), piece)
            pipe.hincrby(self.keys.channel(channel, "m"), "bytes", len(piece))
        if stored:
            pipe.hincrby(self.keys.channel(channel, "m"), "stores", 1)
        pipe.execute()

    def channel_close(self, channel: int, token: str) -> None:
        self._channel_close(keys=[self.keys.channel(channel, "w")], args=[token])

    def channel_states(self, channels: Sequence[int]) -> list[ChannelState]:
        pipe = self.r.pipeline(transaction=False)
        for c in channels:
            pipe.exists(self.keys.channel(c, "w"))
            pipe.hgetall(self.keys.channel(c, "m"))
        replies = pipe.execute()
        return [ChannelState(bool(is_open), int(meta.get(b"bytes", 0)), int(meta.get(b"stores", 0)))
                for is_open, meta in zip(replies[0::2], replies[1::2])]

    def channel_read(self, channel: int, start: int, count: int) -> list[bytes]:
        return cast("list[bytes]", self.r.lrange(self.keys.channel(channel, "d"), start, start + count - 1))   # bytes

    def channel_reset(self, channels: Sequence[int]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for c in channels:
            pipe.delete(self.keys.channel(c, "w"))
        return [bool(n) for n in pipe.execute()]

    # -- request queue ------------------------------------------------------
    def enqueue(self, request: bytes) -> None:
        self.r.rpush(self.keys.queue, request)

    def dequeue(self, timeout: float = 0.0) -> bytes | None:
        if timeout > 0:
            item = cast("tuple[bytes, bytes] | None", self.r.blpop([self.keys.queue], timeout=timeout))   # bytes
            return item[1] if item else None
        return cast("bytes | None", self.r.lpop(self.keys.queue))   # bytes

    def queued(self) -> int:
        return int(self.r.llen(self.keys.queue))

    # -- shared file pointers -----------------------------------------------
    def shared_pointer(self, path: str, token: str, delta: int = 0) -> int:
        return int(self.r.hincrby(self.keys.file(file_id(path), "p"), token, delta)) - delta

    def set_shared_pointer(self, path: str, token: str, value: int) -> None:
        self.r.hset(self.keys.file(file_id(path), "p"), token, value)

    def drop_shared_pointer(self, path: str, token: str) -> None:
        self.r.hdel(self.keys.file(file_id(path), "p"), token)

    # -- I/O statistics -----------------------------------------------------
    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        args = _stats_args(path, who, counters)
        if args:
            self._stats_add(keys=[self.keys.stats], args=args)

    def stats_log(self, event: Mapping[str, Any]) -> None:
        self._stats_push(keys=[self.keys.stats_log], args=[json.dumps(event)])

    def stats_log_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        self._pipelined([(self._stats_push, [self.keys.stats_log], [json.dumps(event)]) for event in events])

    def stats(self) -> tuple[dict[str, dict[str, dict[str, int]]], list[dict[str, Any]]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.keys.stats)
        pipe.lrange(self.keys.stats_log, 0, -1)
        raw, log = pipe.execute()
        counters: dict[str, dict[str, dict[str, int]]] = {}
        for field, value in raw.items():
            path, who, name = field.decode().split("\0")
            counters.setdefault(path, {}).setdefault(who, {})[name] = int(value)
        return counters, [json.loads(e) for e in log]

    # -- the whole store ----------------------------------------------------
    def memory(self) -> tuple[int, int]:
        info = self.r.info("memory")
        return int(info["used_memory"]), int(info.get("maxmemory") or 0)

    def traffic(self) -> tuple[int, int]:
        info = self.r.info("stats")
        return int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"])

    def empty(self) -> bool:
        pipe = self.r.pipeline(transaction=True)
        pipe.dbsize()
        pipe.exists(self.keys.stats, self.keys.stats_log)
        keys, stats = pipe.execute()
        return keys == stats

    def close(self) -> None:
        self._sockets.close()
        self.r.close()


@public_methods_translated
class RedisBatchWriter(BatchWriter):
    """Pipelined commits on a connection of their own (see :class:`~mpiburst.store.base.BatchWriter`).

    The payload goes from the caller's memory to ``sendall`` untouched
    (:func:`~mpiburst.store.resp.resp_frames`), so a writer can fill its next
    batch while the server stores this one. The connection is the pool's
    only while a batch is in flight: a process may hold more open files
    than the pool has connections (redis-py's default: 100).
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._conn: Any = None
        self._tmp: str | None = None
        self._stats: tuple[str, str, Mapping[str, int]] | None = None   # sent behind the batch in flight
        self._held: list[tuple] | None = None   # a closing batch not yet on the wire (see send)
        self._replies = 0   # of the batch in flight's commands
        self._new = False   # whether they begin with a new file's create

    def send(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
             closing: bool = False, new: NewFile | None = None) -> None:
        """Send one batch; a closing one waits for the handle's counters (:meth:`stats_add`) or :meth:`finish`.

        A handle's last batch is followed by its counters: held back until
        then, both leave in one send (a small file's record, batch and
        counters in one system call and one wake-up of the server, not four).
        """
        tmp, commands = self.store._pack_commit(path, channel, payload, extents, closing=closing, new=new)
        self.store._ensure_loaded()
        if closing:
            self._held = commands
        else:
            self._put(commands)
        self._tmp = tmp
        self._replies = len(commands)
        self._new = new is not None
        self.made = False

    def _put(self, commands: list[tuple]) -> None:
        """Send ``commands`` on the writer's connection (a failed send closes it: its stream is unknown)."""
        if self._conn is None:
            self._conn = borrow(self.store.r.connection_pool)
        try:
            self._conn.send_packed_command(resp_frames(commands), check_health=False)
        except BaseException:
            self._conn.disconnect()
            raise

    def finish(self) -> int:
        tmp, self._tmp = self._tmp, None
        stats, self._stats = self._stats, None
        if tmp is None:
            raise RuntimeError("finish() without a batch in flight")
        held, self._held = self._held, None
        if held is not None:   # a closing batch no counters followed
            self._put(held)
        replies: list = []
        try:
            for _ in range(self._replies + (stats is not None)):
                try:
                    replies.append(self._conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._conn.disconnect()  # a half-read reply stream must not be reused
            raise
        finally:
            self.close()   # nothing in flight: the connection goes back to the pool
        if stats is not None and isinstance(replies.pop(), Exception):   # not added (a restarted server's
            self.store.stats_add(*stats)                                  # empty script cache): alone, again
        self.made = self._new and not isinstance(replies[0], Exception)
        return self.store._commit_result(tmp, replies)

    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        args = _stats_args(path, who, counters)
        if self._tmp is None or self._stats is not None or not args:
            self.store.stats_add(path, who, counters)
            return
        command = ("EVALSHA", self.store._stats_add.sha, 1, self.store.keys.stats, *args)
        held, self._held = self._held, None
        self._put([*(held or []), command])
        self._stats = (path, who, counters)

    def close(self) -> None:
        if self._conn is not None:
            self.store.r.connection_pool.release(self._conn)
            self._conn = None



def _record_of(reply: Any) -> FileMeta:
    """Return the record a script's ``HGETALL`` reply holds (a flat list, or a map under RESP3)."""
    if isinstance(reply, dict):
        return schema.meta_from(reply)
    return schema.meta_from(dict(zip(reply[::2], reply[1::2])))


def _stats_args(path: str, who: str, counters: Mapping[str, int]) -> list:
    """Return the ARGV of :data:`~mpiburst.store.schema.STATS_ADD` for ``counters`` of ``path`` and process ``who``."""
    args: list = []
    for name, value in counters.items():
        args += [f"{path}\0{who}\0{name}", int(value)]
    return args


def _scatter(out: np.ndarray, lo: int, run: Strided, i: int, j: int, data: memoryview) -> None:
    """Copy blocks ``[i, j)`` of ``run`` (packed in ``data``) to their places in ``out``, the window from ``lo``.

    The blocks wholly inside the window go in one numpy copy through a
    strided view of ``out``; the (at most two) cut by its edges, one by one.
    """
    hi = lo + len(out)
    ln, st = run.length, run.stride
    src = np.frombuffer(data, dtype=np.uint8)
    first = max(i, -(-(lo - run.start) // st))           # first block starting at or after lo
    stop = max(first, min(j, (hi - ln - run.start) // st + 1))   # blocks before it end by hi
    if first < stop:
        at = run.start + first * st - lo
        dst = np.lib.stride_tricks.as_strided(out[at:], shape=(stop - first, ln), strides=(st, 1))
        dst[...] = src[(first - i) * ln:(stop - i) * ln].reshape(stop - first, ln)
    for k in [*range(i, min(first, j)), *range(max(stop, i), j)]:
        b0 = run.start + k * st
        a, b = max(lo, b0), min(hi, b0 + ln)
        if a < b:
            s = (k - i) * ln + a - b0
            out[a - lo:b - lo] = src[s:s + b - a]




def _clip(e: Extent, lo: int, hi: int) -> Extent:
    """Return the part of extent ``e`` inside ``[lo, hi)``."""
    a, b = max(lo, e.start), min(hi, e.end)
    return Extent(e.seq, a, b - a, e.blob, e.boff + a - e.start)




def coalesce(pieces: Sequence[Extent]) -> list[tuple[Extent, list[Extent]]]:
    """Plan the reads of non-overlapping ``pieces``: ``(span, pieces it carries)``.

    A large piece is its own read (``span`` is the piece, received in place).
    Small pieces close together in one blob share a read whose ``span``
    covers them (only its ``blob``, ``boff`` and ``length`` matter).
    """
    reads: list[tuple[Extent, list[Extent]]] = []
    group: list[Extent] = []

    def close() -> None:
        if group:
            first, last = group[0], group[-1]
            span = Extent(0, first.start, last.boff + last.length - first.boff, first.blob, first.boff)
            reads.append((first if len(group) == 1 else span, list(group)))
            group.clear()

    for e in sorted(pieces, key=lambda e: (e.blob, e.boff)):
        if e.length >= _SMALL_PIECE:
            reads.append((e, [e]))
            continue
        if group and (e.blob != group[0].blob or e.boff - (group[-1].boff + group[-1].length) > _MERGE_GAP
                      or e.boff + e.length - group[0].boff > _MERGE_SPAN):
            close()
        group.append(e)
    close()
    return reads
