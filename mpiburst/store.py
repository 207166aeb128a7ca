"""The data model of files in the tier, over plain Redis keys and two small Lua scripts.

Layout (every key of one file shares the hash tag ``{fid}``, so Redis Cluster
could shard by file later)::

    mpb:files            hash  fid -> BFS path          (registry, for ls / auto engine)
    mpb:{fid}:m          hash  path, size, seq, clean, pending, trunc, pinned, bfs, umask
    mpb:{fid}:x          zset  extents scored by file offset;
                               member "seq:boff:len:blob" (ASCII decimals)
    mpb:{fid}:B          zset  blobs scored by their last seq;
                               member "blob:nextents:nbytes:channel"
    mpb:{fid}:b:<blob>   string payload of one client batch (many extents)
    mpb:{fid}:t:<token>  string a batch in flight (renamed by the commit script)
    mpb:{fid}:lock       string the flush lease of the file

Every extent is at most :data:`MAX_EXTENT` bytes long, so the extents that
overlap ``[a, b)`` are exactly those with ``a - MAX_EXTENT < start < b`` and
one ``ZRANGEBYSCORE`` finds them without scanning the file.

A batch is committed in one round trip: ``SET`` of the payload under a
temporary key, then the commit script, which takes the batch's sequence
numbers from the file's counter, renames the payload to its blob key and
indexes its extents. The payload never passes through Lua (that costs
30-45 %, see REFERENCE.md).

States: an extent with ``seq <= clean`` is on the BFS (clean); with
``clean < seq <= pending`` it is being flushed (pending); any other is dirty.
Prestaged data is stored with ``seq = 0``: always clean, always older than any
write.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import redis

from .buffers import borrowed
from .errors import TierFullError
from .overlay import Extent, paint
from .resp import read_bulks_into, resp_frames

#: Longest extent in the index, in bytes; bounds the slack of range queries.
MAX_EXTENT = 256 << 10
#: Largest blob one SET carries (well below the server's 512 MB bulk limit).
MAX_BLOB = 64 << 20
#: Members per ZADD inside Lua (stays far below Lua's stack limit).
_ZADD_CHUNK = 1000
#: Pieces shorter than this are fetched together with their neighbours in the blob.
_SMALL_PIECE = 64 << 10
#: Largest unwanted stretch of a blob read to fetch two small pieces with one ``GETRANGE``.
_MERGE_GAP = 64 << 10
#: Largest read that gathers small pieces.
_MERGE_SPAN = 1 << 20

_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOFILE the file has no record in the tier') end
local n = tonumber(ARGV[2])
local base, last, blob
if ARGV[6] == '1' then
  base, last = 0, 0
  blob = -redis.call('HINCRBY', KEYS[1], 'staged', 1)
else
  last = redis.call('HINCRBY', KEYS[1], 'seq', n)
  base = last - n + 1
  blob = base
end
redis.call('RENAME', KEYS[4], ARGV[1] .. blob)
local args = {}
for i = 0, n - 1 do
  local seq = base
  if base > 0 then seq = base + i end
  args[#args + 1] = ARGV[7 + 3 * i]
  args[#args + 1] = seq .. ':' .. ARGV[8 + 3 * i] .. ':' .. ARGV[9 + 3 * i] .. ':' .. blob
  if #args >= %d then
    redis.call('ZADD', KEYS[2], unpack(args))
    args = {}
  end
end
if #args > 0 then redis.call('ZADD', KEYS[2], unpack(args)) end
redis.call('ZADD', KEYS[3], last, blob .. ':' .. n .. ':' .. ARGV[4] .. ':' .. ARGV[5])
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
if tonumber(ARGV[3]) > size then redis.call('HSET', KEYS[1], 'size', ARGV[3]) end
return base
""" % (2 * _ZADD_CHUNK)

# Clip the index at a new size: drop extents past it, shorten the one across it.
_TRUNCATE = """
local n = tonumber(ARGV[1])
local maxext = tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
local hit = redis.call('ZRANGEBYSCORE', KEYS[2], n - maxext, '+inf', 'WITHSCORES')
for i = 1, #hit, 2 do
  local m = hit[i]
  local start = tonumber(hit[i + 1])
  local seq, boff, len, blob = string.match(m, '^(%d+):(%d+):(%d+):(-?%d+)$')
  len = tonumber(len)
  if start >= n then
    redis.call('ZREM', KEYS[2], m)
  elseif start + len > n then
    redis.call('ZREM', KEYS[2], m)
    redis.call('ZADD', KEYS[2], start, seq .. ':' .. boff .. ':' .. (n - start) .. ':' .. blob)
  end
end
local cut = math.min(old, n)
local trunc = redis.call('HGET', KEYS[1], 'trunc')
if trunc == false or tonumber(trunc) > cut then redis.call('HSET', KEYS[1], 'trunc', cut) end
redis.call('HSET', KEYS[1], 'size', n)
return old
"""

# The flush's bookkeeping must run when the tier is full (noeviction refuses every write
# then, and the flush is what makes room): these scripts carry the allow-oom flag.
_ALLOW_OOM = "#!lua flags=allow-oom\n"

# Take a file's flush lease.
_LEASE = """
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
"""

# Extend a lease, only for its holder.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Record the snapshot a flush takes; return the file's record.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HSET', KEYS[1], 'pending', redis.call('HGET', KEYS[1], 'seq') or '0')
return redis.call('HGETALL', KEYS[1])
"""

# Mark a flush snapshot clean, but only for the flush that holds the lease.
_MARK_CLEAN = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local upto = tonumber(ARGV[2])
local clean = tonumber(redis.call('HGET', KEYS[1], 'clean') or '0')
if upto > clean then redis.call('HSET', KEYS[1], 'clean', upto) end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'trunc') == ARGV[3] then
  redis.call('HDEL', KEYS[1], 'trunc')
end
redis.call('HSET', KEYS[1], 'bfs', '1')
redis.call('HDEL', KEYS[1], 'pending')
redis.call('DEL', KEYS[2])
return 1
"""

# Release a lease only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'pending')
  return 1
end
return 0
"""


class RecordGone(Exception):
    """A commit did not run and can simply be sent again: its file has no record (purged or
    deleted meanwhile: register it first) or the server had lost the commit script."""


def store_of(tier) -> "Store":
    """Return the :class:`Store` over ``tier``'s connection (one per tier, cached on it)."""
    store = getattr(tier, "_mpiburst_store", None)
    if store is None:
        store = Store(tier.redis, allow_oom=not getattr(tier, "is_memory", False))
        tier._mpiburst_store = store
    return store


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
    umask : int or None
        The umask of the process that first created or opened the file
        through mpiburst: the flush gives new BFS files and directories the
        mode it gives (:mod:`mpiburst.perms`). None if not recorded.
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

    @property
    def dirty(self) -> bool:
        """True if the tier holds writes, or a truncation, not yet on the BFS."""
        return self.seq > self.clean or self.trunc is not None


class Store:
    """Files in the tier: commit batches, find and fetch extents, track states.

    Parameters
    ----------
    client
        A redis-py client (real server or, in unit tests, fakeredis).
    allow_oom
        Let the flush's bookkeeping scripts run on a full tier (Redis >= 7 script
        flags); False for fakeredis, which does not parse them.
    """

    def __init__(self, client: redis.Redis, allow_oom: bool = True):
        self.r = client
        oom = _ALLOW_OOM if allow_oom else ""  # fakeredis (memory tier) parses no script flags
        self._commit = client.register_script(_COMMIT)
        self._truncate = client.register_script(_TRUNCATE)
        self._lease = client.register_script(oom + _LEASE)
        self._renew = client.register_script(oom + _RENEW)
        self._begin = client.register_script(oom + _BEGIN)
        self._mark_clean = client.register_script(oom + _MARK_CLEAN)
        self._release = client.register_script(oom + _RELEASE)
        self._loaded = False

    # -- keys ---------------------------------------------------------------
    @staticmethod
    def key(fid: str, part: str) -> str:
        """Return the key of one part of file ``fid`` (``m``, ``x``, ``B``, ``lock``, ``b:<n>``)."""
        return f"mpb:{{{fid}}}:{part}"

    # -- files --------------------------------------------------------------
    def meta(self, path: str) -> FileMeta | None:
        """Return the tier's record of ``path``, or None if the tier does not know it."""
        raw = self.r.hgetall(self.key(file_id(path), "m"))
        if not raw:
            return None
        return _meta_from(raw)

    def create(self, path: str, bfs_size: int | None, umask: int | None = None) -> FileMeta:
        """Make the tier's record of ``path`` unless it exists; return the record.

        ``bfs_size`` is the size of the BFS file (None when there is none):
        the logical size starts there. ``umask`` is the creating process's
        umask, kept for the flush (:attr:`FileMeta.umask`).
        """
        fid = file_id(path)
        mkey = self.key(fid, "m")
        fields = {"path": path, "size": bfs_size or 0, "seq": 0, "clean": 0,
                  "bfs": 1 if bfs_size is not None else 0}
        if umask is not None:
            fields["umask"] = umask
        pipe = self.r.pipeline(transaction=True)
        for name, value in fields.items():
            pipe.hsetnx(mkey, name, value)
        pipe.hset("mpb:files", fid, path)
        pipe.hgetall(mkey)
        return _meta_from(pipe.execute()[-1])

    def files(self) -> dict[str, str]:
        """Return ``{path: fid}`` of every file the tier holds."""
        return {p.decode(): f.decode() for f, p in self.r.hgetall("mpb:files").items()}

    def drop(self, path: str) -> None:
        """Remove every key of ``path`` from the tier (its data is lost)."""
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        for key in self.r.scan_iter(match=f"mpb:{{{fid}}}:*", count=1000):
            pipe.unlink(key)
        pipe.hdel("mpb:files", fid)
        pipe.execute()

    def set_pinned(self, path: str, pinned: bool) -> None:
        """Pin (exempt from automatic sync and purge) or unpin ``path``."""
        mkey = self.key(file_id(path), "m")
        if pinned:
            self.r.hset(mkey, "pinned", 1)
        else:
            self.r.hdel(mkey, "pinned")

    def set_size(self, path: str, size: int) -> int:
        """Set the logical size of ``path``, clipping extents past it; return the old size."""
        fid = file_id(path)
        return int(self._truncate(keys=[self.key(fid, "m"), self.key(fid, "x")], args=[size, MAX_EXTENT]))

    # -- writes -------------------------------------------------------------
    def commit(self, path: str, channel: int, payload: bytes | bytearray | memoryview,
               extents: Sequence[tuple[int, int, int]], staged: bool = False) -> int:
        """Store one batch: ``payload`` and its ``(file offset, payload offset, length)`` extents.

        Extents are listed in write order; each gets the next sequence number
        of the file, so later ones win. Every length must be at most
        :data:`MAX_EXTENT` and the payload at most :data:`MAX_BLOB`. With
        ``staged`` the batch is a copy of BFS bytes (prestage): sequence
        number 0, clean, older than every write.

        Returns
        -------
        int
            The sequence number of the first extent.

        Raises
        ------
        TierFullError
            If the server is out of memory; nothing of the batch was stored.
        """
        tmp, commands = self.pack_commit(path, channel, payload, extents, staged)
        self._ensure_loaded()
        pipe = self.r.pipeline(transaction=False)
        pipe.execute_command("SET", tmp, bytes(payload))  # redis-py with hiredis takes no memoryview
        pipe.execute_command(*commands[1])
        return self._commit_result(tmp, pipe.execute(raise_on_error=False))

    def pack_commit(self, path: str, channel: int, payload: bytes | bytearray | memoryview,
                    extents: Sequence[tuple[int, int, int]], staged: bool = False) -> tuple[str, list[tuple]]:
        """Return the temporary key and the two commands that commit one batch (see :meth:`commit`).

        Sent on a dedicated connection with :meth:`send_commit` and finished
        with :meth:`finish_commit`, a writer can fill its next batch while the
        server stores this one.
        """
        fid = file_id(path)
        tmp = self.key(fid, "t:" + secrets.token_hex(8))
        end = max(off + ln for off, _, ln in extents)
        args: list = [self.key(fid, "b:"), len(extents), end, len(payload), channel, int(staged)]
        for off, boff, ln in extents:
            args += (off, boff, ln)
        keys = [self.key(fid, "m"), self.key(fid, "x"), self.key(fid, "B"), tmp]
        return tmp, [("SET", tmp, payload), ("EVALSHA", self._commit.sha, len(keys), *keys, *args)]

    def send_commit(self, conn, commands: list[tuple]) -> None:
        """Send packed commit ``commands`` on connection ``conn`` without waiting for the replies."""
        self._ensure_loaded()
        conn.send_packed_command(resp_frames(commands), check_health=False)

    def finish_commit(self, conn, tmp: str) -> int:
        """Read the replies of a commit sent with :meth:`send_commit`; return its first sequence number."""
        replies = []
        for _ in range(2):
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return self._commit_result(tmp, replies)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.r.script_load(_COMMIT)
            self._loaded = True

    def _commit_result(self, tmp: str, replies: list) -> int:
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            return int(replies[1])
        self.r.unlink(tmp)
        if any(str(e).startswith("NOFILE") for e in errors):
            raise RecordGone(tmp)
        if any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
            self._loaded = False  # the server lost its script cache (restarted): load and retry
            raise RecordGone(tmp)
        if any(isinstance(e, redis.exceptions.OutOfMemoryError) or "OOM" in str(e) for e in errors):
            raise TierFullError(
                "the tier is full (the server reached its memory limit); "
                "sync and purge data or start the run with a larger --capacity.")
        raise errors[0]

    # -- reads --------------------------------------------------------------
    def extents(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Extent]:
        """Return the extents of ``path`` that overlap ``[lo, hi)``.

        With ``upto``, only those with ``seq <= upto`` (a flush snapshot).
        """
        raw = self.r.execute_command("ZRANGEBYSCORE", self.key(file_id(path), "x"), f"({lo - MAX_EXTENT}",
                                     f"({hi}", "WITHSCORES")
        top = float("inf") if upto is None else upto
        return [e for e in _parse_extents(raw) if e.start + e.length > lo and e.seq <= top]

    def window(self, path: str, lo: int, hi: int) -> tuple[FileMeta | None, list[Extent]]:
        """Return the file's record and the extents overlapping ``[lo, hi)``, in one round trip."""
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.key(fid, "m"))
        pipe.execute_command("ZRANGEBYSCORE", self.key(fid, "x"), f"({lo - MAX_EXTENT}", f"({hi}", "WITHSCORES")
        raw_meta, raw = pipe.execute()
        if not raw_meta:
            return None, []
        return _meta_from(raw_meta), [e for e in _parse_extents(raw) if e.start + e.length > lo]

    def all_extents(self, path: str, batch: int = 10000) -> Iterator[Extent]:
        """Yield every extent of ``path`` in offset order, ``batch`` at a time."""
        key = self.key(file_id(path), "x")
        start = 0
        while True:
            found = list(_parse_extents(self.r.execute_command("ZRANGE", key, start, start + batch - 1,
                                                               "WITHSCORES")))
            yield from found
            if len(found) < batch:
                return
            start += batch

    def fetch(self, path: str, extents: Iterable[Extent]) -> list[bytes]:
        """Return the bytes of each extent, in one pipelined round trip."""
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        count = 0
        for e in extents:
            pipe.getrange(self.key(fid, f"b:{e.blob}"), e.boff, e.boff + e.length - 1)
            count += 1
        if not count:
            return []
        return pipe.execute()

    def fetch_into(self, path: str, extents: Iterable[Extent], lo: int, out: memoryview) -> bool:
        """Paint ``extents`` into ``out``, the window ``[lo, lo + len(out))`` of ``path``; the newest wins.

        Each extent is clipped to the window. The reads go out as one pipeline
        of ``GETRANGE``: a large piece is received straight into ``out``;
        small pieces lying close together in one blob (a batch of small
        records) share one read into a scratch buffer and are copied out
        from there. When pieces overlap in the file, each is read on its own,
        in sequence order, so the newest write wins byte for byte. Bytes no
        extent covers are left as they were.

        Returns
        -------
        bool
            False if an extent's blob vanished meanwhile (a purge): ``out``
            is then incomplete and the caller must look again.
        """
        hi = lo + len(out)
        pieces = [e if lo <= e.start and e.start + e.length <= hi else _clip(e, lo, hi)
                  for e in extents if e.start < hi and e.start + e.length > lo]
        if not pieces:
            return True
        conn = self.r.connection_pool.get_connection()
        sock = getattr(conn, "_sock", None)
        if not isinstance(sock, socket.socket):  # an in-process fake tier: fetch, then paint
            self.r.connection_pool.release(conn)
            payloads = self.fetch(path, pieces)
            paint(lo, hi, pieces, payloads, out=out)
            return all(len(p) == e.length for p, e in zip(payloads, pieces))
        if _overlapping(pieces):
            reads = [(e, [e]) for e in sorted(pieces, key=lambda e: e.seq)]   # newest last: it wins
        else:
            reads = _coalesce(pieces)
        with borrowed(sum(span.length for span, group in reads if len(group) > 1)) as scratch:
            return self._read_into(conn, sock, path, reads, lo, out, scratch)

    def _read_into(self, conn, sock: socket.socket, path: str, reads: list[tuple[Extent, list[Extent]]],
                   lo: int, out: memoryview, scratch: memoryview) -> bool:
        """Send the planned ``reads`` on ``conn`` and land their bytes in ``out`` (via ``scratch``)."""
        views, used = [], 0
        for span, group in reads:
            if len(group) == 1:
                views.append(out[span.start - lo:span.end - lo])
            else:
                views.append(scratch[used:used + span.length])
                used += span.length
        key = self.key(file_id(path), "b:")
        commands = [("GETRANGE", f"{key}{span.blob}", span.boff, span.boff + span.length - 1) for span, _ in reads]
        try:
            conn.send_packed_command(resp_frames(commands), check_health=False)
            lengths = read_bulks_into(sock, views)
        except BaseException:
            conn.disconnect()  # a half-read reply stream must not be reused
            raise
        finally:
            self.r.connection_pool.release(conn)
        if any(n != span.length for n, (span, _) in zip(lengths, reads)):
            return False
        for (span, group), view in zip(reads, views):
            if len(group) > 1:
                for e in group:
                    out[e.start - lo:e.end - lo] = view[e.boff - span.boff:e.boff - span.boff + e.length]
        return True

    def blobs(self, path: str, lo_seq: float = 0, hi_seq: float = float("inf")) -> list[tuple[int, int, int, int, int]]:
        """Return ``(blob, last seq, extents, bytes, channel)`` of blobs whose last seq is in ``[lo_seq, hi_seq]``."""
        raw = self.r.zrangebyscore(self.key(file_id(path), "B"), lo_seq,
                                   "+inf" if hi_seq == float("inf") else hi_seq, withscores=True)
        out = []
        for member, score in raw:
            blob, n, nbytes, chan = (int(v) for v in member.split(b":"))
            out.append((blob, int(score), n, nbytes, chan))
        return out

    # -- flush bookkeeping ----------------------------------------------------
    def lease(self, path: str, seconds: float) -> str | None:
        """Take the flush lease of ``path`` for ``seconds``; return its token, or None if held."""
        token = secrets.token_hex(8)
        ok = self._lease(keys=[self.key(file_id(path), "lock")], args=[token, int(seconds * 1000)])
        return token if ok else None

    def renew(self, path: str, token: str, seconds: float) -> bool:
        """Extend the lease ``token`` holds; False if it was lost."""
        return bool(self._renew(keys=[self.key(file_id(path), "lock")], args=[token, int(seconds * 1000)]))

    def begin(self, path: str) -> FileMeta:
        """Record that a flush of everything written so far started; return the snapshot meta."""
        flat = self._begin(keys=[self.key(file_id(path), "m")])
        return _meta_from(dict(zip(flat[::2], flat[1::2])))

    def mark_clean(self, path: str, token: str, upto: int, trunc: int | None) -> bool:
        """Declare extents up to ``upto`` clean (and ``trunc`` applied) if ``token`` still holds the lease."""
        fid = file_id(path)
        done = self._mark_clean(keys=[self.key(fid, "m"), self.key(fid, "lock")],
                                args=[token, upto, "" if trunc is None else trunc])
        return bool(done)

    def release(self, path: str, token: str) -> None:
        """Give the lease back after a failed flush; the data stays dirty."""
        fid = file_id(path)
        self._release(keys=[self.key(fid, "m"), self.key(fid, "lock")], args=[token])

    def drop_clean(self, path: str) -> int:
        """Free the blobs of ``path`` whose extents are all clean; return the bytes freed.

        The file's record stays, so reads fall through to the BFS copy.
        """
        meta = self.meta(path)
        if meta is None:
            return 0
        fid = file_id(path)
        clean_blobs = self.blobs(path, 0, meta.clean)
        if not clean_blobs:
            return 0
        gone = {b[0] for b in clean_blobs}
        xkey = self.key(fid, "x")
        pipe = self.r.pipeline(transaction=False)
        members = []
        for member in self.r.zscan_iter(xkey, count=5000):
            name = member[0]
            if int(name.rsplit(b":", 1)[1]) in gone:
                members.append(name)
                if len(members) >= _ZADD_CHUNK:
                    pipe.zrem(xkey, *members)
                    members = []
        if members:
            pipe.zrem(xkey, *members)
        for blob, _last, n, nbytes, chan in clean_blobs:
            pipe.unlink(self.key(fid, f"b:{blob}"))
            pipe.zrem(self.key(fid, "B"), f"{blob}:{n}:{nbytes}:{chan}")
        pipe.execute()
        return sum(b[3] for b in clean_blobs)

    # -- shared file pointers (mpiburst.File; one counter per open of a file) ------
    def shared_pointer(self, path: str, token: str, delta: int = 0) -> int:
        """Add ``delta`` to the shared file pointer of open ``token`` atomically; return its value before."""
        return self.r.incrby(self.key(file_id(path), f"sfp:{token}"), delta) - delta

    def set_shared_pointer(self, path: str, token: str, value: int) -> None:
        """Set the shared file pointer of open ``token`` of ``path``."""
        self.r.set(self.key(file_id(path), f"sfp:{token}"), value)

    def drop_shared_pointer(self, path: str, token: str) -> None:
        """Forget the shared file pointer of open ``token`` (the file is closed)."""
        self.r.delete(self.key(file_id(path), f"sfp:{token}"))


def _meta_from(raw: dict) -> FileMeta:
    g = {k.decode(): v.decode() for k, v in raw.items()}
    return FileMeta(
        path=g.get("path", ""),
        size=int(g.get("size", 0)),
        seq=int(g.get("seq", 0)),
        clean=int(g.get("clean", 0)),
        pending=int(g.get("pending", 0)),
        trunc=int(g["trunc"]) if "trunc" in g else None,
        pinned=g.get("pinned") == "1",
        bfs=g.get("bfs") == "1",
        umask=int(g["umask"]) if "umask" in g else None,
    )


def _parse_extents(raw: list) -> Iterator[Extent]:
    """Yield the extents of a raw ``ZRANGE…WITHSCORES`` reply on an index (RESP2 or RESP3).

    Parsed here, not by redis-py's score callback, which cost a third of a
    flush's index reads: this runs once per extent of every read and flush.
    """
    pairs = raw if raw and isinstance(raw[0], list) else zip(raw[::2], raw[1::2])
    for member, score in pairs:
        seq, boff, length, blob = member.split(b":")
        yield Extent(int(seq), int(score), int(length), int(blob), int(boff))


def _clip(e: Extent, lo: int, hi: int) -> Extent:
    """Return the part of extent ``e`` inside ``[lo, hi)``."""
    a, b = max(lo, e.start), min(hi, e.end)
    return Extent(e.seq, a, b - a, e.blob, e.boff + a - e.start)


def _overlapping(pieces: Sequence[Extent]) -> bool:
    """True if any two of ``pieces`` share a file byte."""
    end = -1
    for e in sorted(pieces, key=lambda e: e.start):
        if e.start < end:
            return True
        end = e.start + e.length
    return False


def _coalesce(pieces: Sequence[Extent]) -> list[tuple[Extent, list[Extent]]]:
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
