"""The tier store over a real Redis or Valkey server: plain keys, small Lua scripts, raw RESP for bulk bytes.

Layout of a single-server run (every key of one file shares the hash tag
``{fid}``, every key of one channel the tag ``{chan:C}``). Every name starts
with the store's prefix, ``mpb:`` here; a shard of a cluster store
(:mod:`mpiburst.store.cluster_store`) uses ``mpb:{<node tag>}:`` instead, so
all of its keys hash to one slot of its own server::

    mpb:files            hash   fid -> BFS path          (registry, for ls / auto engine)
    mpb:{fid}:m          hash   path, size, seq, clean, pending, trunc, pinned, bfs, staged, umask,
                                fence (a cluster shard: lowest sequence number it accepts, minus one)
    mpb:{fid}:x          zset   extents scored by file offset;
                                member "seq:boff:len:blob" (ASCII decimals)
    mpb:{fid}:v          zset   strided runs scored by their first block's offset;
                                member "seq:boff:len:blob:count:stride"
    mpb:{fid}:B          zset   blobs scored by their last seq;
                                member "blob:nextents:nbytes:channel"
    mpb:{fid}:b:<blob>   string payload of one client batch (many extents)
    mpb:{fid}:t:<token>  string a batch in flight (renamed by the commit script)
    mpb:{fid}:lock       string the flush lease of the file
    mpb:{fid}:sfp:<tok>  string the shared file pointer of one open of the file (INCRBY)
    mpb:{chan:C}:d       list   a channel's bytes, in pieces
    mpb:{chan:C}:m       hash   bytes, stores (present = the channel was used)
    mpb:{chan:C}:w       string writer token; present = the channel is open
    mpb:queue            list   requests for the automatic engine (JSON)
    mpb:stats            hash   "path\0process\0counter" -> integer (I/O statistics)
    mpb:stats:log        list   events (JSON), one per flush

Every extent is at most :data:`MAX_EXTENT` bytes long, so the extents that
overlap ``[a, b)`` are exactly those with ``a - MAX_EXTENT < start < b`` and
one ``ZRANGEBYSCORE`` finds them without scanning the file.

A batch is committed in one round trip: ``SET`` of the payload under a
temporary key, then the commit script, which takes the batch's sequence
numbers from the file's counter, renames the payload to its blob key and
indexes its extents. The payload never passes through Lua (that cost 30-45 %,
see docs/architecture.md), and is sent from the caller's memory as RESP frames
(:mod:`mpiburst.store.resp`); fetches land straight in the destination buffer.

Only this module knows redis-py: every public method turns the server's
exceptions into :mod:`mpiburst.errors` ones (:func:`_as_mpiburst_error`).
"""

from __future__ import annotations

import functools
import inspect
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import redis

from ..buffers import borrowed
from ..errors import AuthenticationError, MpiburstError, ServerError, TierConnectionError, TierFullError
from ..overlay import Entry, Extent, Strided, expand
from .base import (
    MAX_EXTENT,
    MAX_SPAN,
    BatchWriter,
    Blob,
    ChannelState,
    FileMeta,
    Payload,
    RecordGone,
    Store,
    batch_end,
    file_id,
)
from .connections import Sockets, borrow
from .resp import read_bulks_into, resp_frames

#: Members per ZADD inside Lua (stays far below Lua's stack limit).
_ZADD_CHUNK = 1000
#: Pieces shorter than this are fetched together with their neighbours in the blob.
_SMALL_PIECE = 64 << 10
#: Largest unwanted stretch of a blob read to fetch two small pieces with one ``GETRANGE``.
_MERGE_GAP = 64 << 10
#: Largest read that gathers small pieces.
_MERGE_SPAN = 1 << 20
#: The key prefix of a single-server run.
PREFIX = "mpb:"


def _key(fid: str, part: str, prefix: str = PREFIX) -> str:
    """Return the key of one part of file ``fid`` (``m``, ``x``, ``B``, ``lock``, ``b:<n>``, ``t:<t>``)."""
    return f"{prefix}{{{fid}}}:{part}"

_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOFILE the file has no record in the tier') end
local n = tonumber(ARGV[2])
local base, last, blob
if ARGV[6] == '1' then
  base, last = 0, 0
  blob = -redis.call('HINCRBY', KEYS[1], 'staged', 1)
elseif ARGV[7] ~= '' then
  base = tonumber(ARGV[7])
  if base <= tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') then
    return redis.error_reply('STALE sequence numbers taken before a flush or truncation began')
  end
  last = base + n - 1
  if last > tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') then redis.call('HSET', KEYS[1], 'seq', last) end
  blob = base
else
  last = redis.call('HINCRBY', KEYS[1], 'seq', n)
  base = last - n + 1
  blob = base
end
redis.call('RENAME', KEYS[4], ARGV[1] .. blob)
local k = tonumber(ARGV[8])
local strided = {}
for j = 0, k - 1 do strided[tonumber(ARGV[9 + 3 * j])] = 10 + 3 * j end
local p = 9 + 3 * k
local args, vargs = {}, {}
for i = 0, n - 1 do
  local seq = base
  if base > 0 then seq = base + i end
  local member = seq .. ':' .. ARGV[p + 1 + 3 * i] .. ':' .. ARGV[p + 2 + 3 * i] .. ':' .. blob
  local at = strided[i]
  if at == nil then
    args[#args + 1] = ARGV[p + 3 * i]
    args[#args + 1] = member
    if #args >= %d then
      redis.call('ZADD', KEYS[2], unpack(args))
      args = {}
    end
  else
    vargs[#vargs + 1] = ARGV[p + 3 * i]
    vargs[#vargs + 1] = member .. ':' .. ARGV[at] .. ':' .. ARGV[at + 1]
    if #vargs >= %d then
      redis.call('ZADD', KEYS[5], unpack(vargs))
      vargs = {}
    end
  end
end
if #args > 0 then redis.call('ZADD', KEYS[2], unpack(args)) end
if #vargs > 0 then redis.call('ZADD', KEYS[5], unpack(vargs)) end
redis.call('ZADD', KEYS[3], last, blob .. ':' .. n .. ':' .. ARGV[4] .. ':' .. ARGV[5])
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
if tonumber(ARGV[3]) > size then redis.call('HSET', KEYS[1], 'size', ARGV[3]) end
return base
""" % (2 * _ZADD_CHUNK, 2 * _ZADD_CHUNK)  # noqa: UP031 - str.format would need every Lua brace doubled

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
local hitv = redis.call('ZRANGEBYSCORE', KEYS[3], n - tonumber(ARGV[3]), '+inf', 'WITHSCORES')
for i = 1, #hitv, 2 do
  local m = hitv[i]
  local start = tonumber(hitv[i + 1])
  local seq, boff, len, blob, count, stride = string.match(m, '^(%d+):(%d+):(%d+):(-?%d+):(%d+):(%d+)$')
  boff, len, count, stride = tonumber(boff), tonumber(len), tonumber(count), tonumber(stride)
  if start >= n then
    redis.call('ZREM', KEYS[3], m)
  elseif start + (count - 1) * stride + len > n then
    redis.call('ZREM', KEYS[3], m)
    local q = math.max(0, math.min(count, math.floor((n - start - len) / stride) + 1))
    if q >= 2 then
      redis.call('ZADD', KEYS[3], start, seq .. ':' .. boff .. ':' .. len .. ':' .. blob .. ':' .. q .. ':' .. stride)
    elseif q == 1 then
      redis.call('ZADD', KEYS[2], start, seq .. ':' .. boff .. ':' .. len .. ':' .. blob)
    end
    local at = start + q * stride
    if q < count and at < n then
      redis.call('ZADD', KEYS[2], at, seq .. ':' .. (boff + q * len) .. ':' .. (n - at) .. ':' .. blob)
    end
  end
end
local cut = math.min(old, n)
local trunc = redis.call('HGET', KEYS[1], 'trunc')
if trunc == false or tonumber(trunc) > cut then redis.call('HSET', KEYS[1], 'trunc', cut) end
redis.call('HSET', KEYS[1], 'size', n)
redis.call('HINCRBY', KEYS[1], 'truncs', 1)
return old
"""

# The flush's bookkeeping must run when the tier is full (noeviction refuses every write
# then, and the flush is what makes room): these scripts carry the allow-oom flag.
_ALLOW_OOM = "#!lua flags=allow-oom\n"

# Add counters (ARGV: name, value, name, value, ...) to the statistics hash.
_STATS_ADD = """
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 0
"""

# Append one event to the statistics log (the engine samples a full tier too).
_STATS_LOG_PUSH = """
redis.call('RPUSH', KEYS[1], ARGV[1])
return 0
"""

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


# A consistent cut: every file's record, read in one atomic step over the registry (KEYS[1]);
# ARGV[1] is the prefix of the record keys. Read-only, so it runs on a full tier too. A
# Redis Cluster store cannot do this in one script (the records live in many slots).
_CUT = """
local files = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #files, 2 do
  local m = redis.call('HGETALL', ARGV[1] .. '{' .. files[i] .. '}:m')
  if #m > 0 then out[#out + 1] = m end
end
return out
"""

# Count a handle opening / closing a file for writing (KEYS[1]: the record; ARGV: delta, settle_at_most):
# when the count after the change is at most settle_at_most, the file's seq, size and truncation count
# now are its settled mark. -1 for a file without a record. Runs on a full tier (a Close must always be counted).
_WRITERS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'writers', ARGV[1])
if n < 0 then
  redis.call('HSET', KEYS[1], 'writers', 0)
  n = 0
end
if n <= tonumber(ARGV[2]) then
  local m = redis.call('HMGET', KEYS[1], 'seq', 'size', 'truncs')
  redis.call('HSET', KEYS[1], 'settled', m[1] or 0, 'settled_size', m[2] or 0, 'settled_truncs', m[3] or 0)
end
return n
"""

# Close a channel only for the writer that opened it (a reset may have taken it meanwhile).
_CHANNEL_CLOSE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_FULL = ("the tier is full (the server reached its memory limit); sync and purge data, "
         "or start the run with a larger --capacity.")


def _as_mpiburst_error(exc: BaseException) -> MpiburstError:
    """Return the mpiburst error that tells a person what a redis-py (or socket) exception means."""
    if isinstance(exc, redis.AuthenticationError):
        return AuthenticationError(f"the tier's server refused the run's credentials ({exc}); "
                                   "check that the conf file belongs to the running server.")
    if isinstance(exc, redis.OutOfMemoryError) or (isinstance(exc, redis.ResponseError)
                                                    and str(exc).startswith("OOM")):
        return TierFullError(_FULL)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return TierConnectionError(f"lost the connection to the tier's server ({exc or type(exc).__name__}); "
                                   "check that the run is up with 'mpiburst status' and read its server log.")
    return ServerError(f"the tier's server refused a request ({exc}); read its server log.")


# redis-py types a reply as ``bytes | str`` (its types cannot tell ``decode_responses``); the
# clients here never decode, so the replies marked ``# bytes`` are cast to bytes (no runtime cost).

_F = TypeVar("_F", bound=Callable[..., Any])


def _translated(fn: _F) -> _F:
    """Wrap ``fn`` (a function or generator function) so it raises mpiburst errors, never redis-py's."""
    raw = (redis.RedisError, OSError)
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except raw as exc:
                raise _as_mpiburst_error(exc) from exc
        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except raw as exc:
            raise _as_mpiburst_error(exc) from exc
    return call  # type: ignore[return-value]


_C = TypeVar("_C", bound=type)


def _public_methods_translated(cls: _C) -> _C:
    """Class decorator: apply :func:`_translated` to every public method ``cls`` defines."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, _translated(value))
    return cls


@_public_methods_translated
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
        self._sockets = Sockets(client)   # the fetches' own (mpiburst.store.connections)
        #: The registry of files, the engine's request queue, the I/O statistics (not data: ``empty`` ignores them).
        self._files = prefix + "files"
        self._queue = prefix + "queue"
        self._stats = prefix + "stats"
        self._stats_log = prefix + "stats:log"
        self._commit = client.register_script(_COMMIT)
        self._truncate = client.register_script(_TRUNCATE)
        # The flush's bookkeeping must run when the tier is full (it is what makes room).
        self._lease = client.register_script(_ALLOW_OOM + _LEASE)
        self._renew = client.register_script(_ALLOW_OOM + _RENEW)
        self._begin = client.register_script(_ALLOW_OOM + _BEGIN)
        self._mark_clean = client.register_script(_ALLOW_OOM + _MARK_CLEAN)
        self._release = client.register_script(_ALLOW_OOM + _RELEASE)
        self._channel_close = client.register_script(_ALLOW_OOM + _CHANNEL_CLOSE)
        self._cut = client.register_script(_CUT)
        self._writers = client.register_script(_ALLOW_OOM + _WRITERS)
        self._stats_add = client.register_script(_ALLOW_OOM + _STATS_ADD)   # a close on a full tier
        self._stats_push = client.register_script(_ALLOW_OOM + _STATS_LOG_PUSH)
        self._loaded = False

    def _key(self, fid: str, part: str) -> str:
        """Return the key of one part of file ``fid`` under this store's prefix (see :func:`_key`)."""
        return _key(fid, part, self.prefix)

    def _chan_key(self, channel: int, part: str) -> str:
        """Return the key of one part of channel ``channel`` (``d``, ``m``, ``w``)."""
        return f"{self.prefix}{{chan:{channel}}}:{part}"

    # -- file records -------------------------------------------------------
    def meta(self, path: str) -> FileMeta | None:
        raw = self.r.hgetall(self._key(file_id(path), "m"))
        if not raw:
            return None
        return _meta_from(raw)

    def create(self, path: str, bfs_size: int | None, umask: int | None = None) -> FileMeta:
        fid = file_id(path)
        mkey = self._key(fid, "m")
        fields: dict[str, str | int] = {"path": path, "size": bfs_size or 0, "seq": 0, "clean": 0,
                                        "bfs": 1 if bfs_size is not None else 0}
        if umask is not None:
            fields["umask"] = umask
        pipe = self.r.pipeline(transaction=True)
        for name, value in fields.items():
            pipe.hsetnx(mkey, name, value)
        pipe.hset(self._files, fid, path)
        pipe.hgetall(mkey)
        return _meta_from(pipe.execute()[-1])

    def files(self) -> dict[str, str]:
        registry = cast("dict[bytes, bytes]", self.r.hgetall(self._files))   # bytes
        return {p.decode(): f.decode() for f, p in registry.items()}

    def cut(self) -> dict[str, FileMeta]:
        out = {}
        for flat in self._cut(keys=[self._files], args=[self.prefix]):
            meta = _meta_from(dict(zip(flat[::2], flat[1::2])))
            meta.pending = 0
            out[meta.path] = meta
        return out

    def drop(self, path: str) -> None:
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        for key in self.r.scan_iter(match=f"{self.prefix}{{{fid}}}:*", count=1000):
            pipe.unlink(key)
        pipe.hdel(self._files, fid)
        pipe.execute()

    def set_pinned(self, path: str, pinned: bool) -> None:
        mkey = self._key(file_id(path), "m")
        if pinned:
            self.r.hset(mkey, "pinned", 1)
        else:
            self.r.hdel(mkey, "pinned")

    def writers(self, path: str, delta: int, settle_at_most: int = -1) -> int:
        return int(self._writers(keys=[self._key(file_id(path), "m")], args=[delta, settle_at_most]))

    def set_size(self, path: str, size: int) -> int:
        fid = file_id(path)
        return int(self._truncate(keys=self._truncate_keys(fid), args=[size, MAX_EXTENT, MAX_SPAN]))

    def _truncate_keys(self, fid: str) -> list[str]:
        """Return the keys the truncation script takes (record, plain index, strided index)."""
        return [self._key(fid, "m"), self._key(fid, "x"), self._key(fid, "v")]

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
                     staged: bool = False, base: int | None = None,
                     tmp: str | None = None) -> tuple[str, list[tuple]]:
        """Return the temporary key and the two commands that commit one batch (see :meth:`commit`).

        ``base``: the batch's first sequence number, taken elsewhere (a
        cluster store's global counter) instead of from the file's record;
        the script then refuses it (``STALE``) if it is not above the
        record's ``fence`` (see :mod:`mpiburst.store.cluster_store`).
        ``tmp``: the temporary key of a payload sent already.
        """
        fid = file_id(path)
        tmp = tmp or self._key(fid, "t:" + secrets.token_hex(8))
        strided: list = []
        plain: list = []
        for i, e in enumerate(extents):
            if len(e) > 3 and e[3] > 1:
                strided += (i, e[3], e[4])
            plain += (e[0], e[1], e[2])
        args: list = [self._key(fid, "b:"), len(extents), batch_end(extents), len(payload), channel, int(staged),
                      "" if base is None else base, len(strided) // 3, *strided, *plain]
        keys = [self._key(fid, "m"), self._key(fid, "x"), self._key(fid, "B"), tmp, self._key(fid, "v")]
        return tmp, [("SET", tmp, payload), ("EVALSHA", self._commit.sha, len(keys), *keys, *args)]

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
        raise errors[0]

    def extents(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Extent]:
        return _blocks(self.index(path, lo, hi, upto), lo, hi)

    def index(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Entry]:
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        self._query(pipe, fid, lo, hi)
        raw, rawv = pipe.execute()
        top = float("inf") if upto is None else upto
        return [e for e in _entries(raw, rawv) if e.end > lo and e.seq <= top]

    def extents_from(self, path: str, start: int, count: int) -> list[Entry]:
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        for part in ("x", "v"):
            pipe.execute_command("ZRANGEBYSCORE", self._key(fid, part), start, "+inf", "WITHSCORES", "LIMIT", 0, count)
        raw, rawv = pipe.execute()
        return _entries(raw, rawv)[:count]

    def window(self, path: str, lo: int, hi: int) -> tuple[FileMeta | None, list[Extent]]:
        fid = file_id(path)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._key(fid, "m"))
        self._query(pipe, fid, lo, hi)
        raw_meta, raw, rawv = pipe.execute()
        if not raw_meta:
            return None, []
        return _meta_from(raw_meta), _blocks([e for e in _entries(raw, rawv) if e.end > lo], lo, hi)

    def all_extents(self, path: str, batch: int = 10000) -> Iterator[Extent]:
        key = self._key(file_id(path), "x")
        strided = _entries([], self.r.execute_command("ZRANGE", self._key(file_id(path), "v"), 0, -1, "WITHSCORES"))
        if strided:   # few entries, many blocks: merged into the offset order of the plain ones
            plain: list[Extent] = []
            for page in self._pages(key, batch):
                plain += page
            yield from sorted(plain + expand(strided), key=_order)
            return
        for page in self._pages(key, batch):
            yield from page

    def _query(self, pipe: Any, fid: str, lo: int, hi: int) -> None:
        """Queue the two index queries (plain, strided) that find every entry that may overlap ``[lo, hi)``."""
        pipe.execute_command("ZRANGEBYSCORE", self._key(fid, "x"), f"({lo - MAX_EXTENT}", f"({hi}", "WITHSCORES")
        pipe.execute_command("ZRANGEBYSCORE", self._key(fid, "v"), f"({lo - MAX_SPAN}", f"({hi}", "WITHSCORES")

    def _pages(self, key: str, batch: int) -> Iterator[list[Extent]]:
        """Yield the plain index ``key`` in pages of ``batch`` extents, in offset order."""
        start = 0
        while True:
            found = list(_parse_extents(self.r.execute_command("ZRANGE", key, start, start + batch - 1,
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
        if _overlapping(pieces):
            reads: list[tuple[Extent, list[Extent]]] = [(e, [e]) for e in sorted(pieces, key=lambda e: e.seq)]
        else:
            reads = _coalesce(pieces)
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
        reads = _coalesce(plain) if plain else []
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
        key = self._key(file_id(path), "b:")
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
                   self.r.zrangebyscore(self._key(file_id(path), "B"), lo_seq,
                                        "+inf" if hi_seq == float("inf") else hi_seq, withscores=True))
        out = []
        for member, score in raw:
            blob, n, nbytes, chan = (int(v) for v in member.split(b":"))
            out.append(Blob(blob, int(score), n, nbytes, chan))
        return out

    def drop_clean(self, path: str) -> int:
        meta = self.meta(path)
        if meta is None:
            return 0
        return self._free_clean(path, meta.clean)

    def _free_clean(self, path: str, clean: int) -> int:
        """Free the batches of ``path`` whose last sequence number is at most ``clean``; return the bytes freed."""
        fid = file_id(path)
        clean_blobs = self.blobs(path, 0, clean)
        if not clean_blobs:
            return 0
        gone = {b.blob for b in clean_blobs}
        xkey = self._key(fid, "x")
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
        vkey = self._key(fid, "v")
        held = cast("list[tuple[bytes, float]]", self.r.zrange(vkey, 0, -1, withscores=True))   # bytes
        runs = [m for m, _ in held if int(m.split(b":")[3]) in gone]
        for i in range(0, len(runs), _ZADD_CHUNK):
            pipe.zrem(vkey, *runs[i:i + _ZADD_CHUNK])
        for b in clean_blobs:
            pipe.unlink(self._key(fid, f"b:{b.blob}"))
            pipe.zrem(self._key(fid, "B"), f"{b.blob}:{b.extents}:{b.bytes}:{b.channel}")
        pipe.execute()
        return sum(b.bytes for b in clean_blobs)

    # -- the flush lease ----------------------------------------------------
    def lease(self, path: str, seconds: float) -> str | None:
        token = secrets.token_hex(8)
        ok = self._lease(keys=[self._key(file_id(path), "lock")], args=[token, max(1, int(seconds * 1000))])
        return token if ok else None

    def renew(self, path: str, token: str, seconds: float) -> bool:
        return bool(self._renew(keys=[self._key(file_id(path), "lock")], args=[token, max(1, int(seconds * 1000))]))

    def begin(self, path: str) -> FileMeta:
        flat = self._begin(keys=[self._key(file_id(path), "m")])
        if isinstance(flat, dict):  # RESP3
            return _meta_from(flat)
        return _meta_from(dict(zip(flat[::2], flat[1::2])))

    def mark_clean(self, path: str, token: str, upto: int, trunc: int | None) -> bool:
        fid = file_id(path)
        done = self._mark_clean(keys=[self._key(fid, "m"), self._key(fid, "lock")],
                                args=[token, upto, "" if trunc is None else trunc])
        return bool(done)

    def release(self, path: str, token: str) -> None:
        fid = file_id(path)
        self._release(keys=[self._key(fid, "m"), self._key(fid, "lock")], args=[token])

    def leased(self, path: str) -> bool:
        return self.r.exists(self._key(file_id(path), "lock")) == 1

    # -- channels -----------------------------------------------------------
    def channel_open(self, channel: int) -> str | None:
        token = secrets.token_hex(8)
        return token if self.r.set(self._chan_key(channel, "w"), token, nx=True) else None

    def channel_append(self, channel: int, pieces: Sequence[bytes], stored: bool = False) -> None:
        pipe = self.r.pipeline(transaction=False)
        for piece in pieces:
            pipe.rpush(self._chan_key(channel, "d"), piece)
            pipe.hincrby(self._chan_key(channel, "m"), "bytes", len(piece))
        if stored:
            pipe.hincrby(self._chan_key(channel, "m"), "stores", 1)
        pipe.execute()

    def channel_close(self, channel: int, token: str) -> None:
        self._channel_close(keys=[self._chan_key(channel, "w")], args=[token])

    def channel_states(self, channels: Sequence[int]) -> list[ChannelState]:
        pipe = self.r.pipeline(transaction=False)
        for c in channels:
            pipe.exists(self._chan_key(c, "w"))
            pipe.hgetall(self._chan_key(c, "m"))
        replies = pipe.execute()
        return [ChannelState(bool(is_open), int(meta.get(b"bytes", 0)), int(meta.get(b"stores", 0)))
                for is_open, meta in zip(replies[0::2], replies[1::2])]

    def channel_read(self, channel: int, start: int, count: int) -> list[bytes]:
        return cast("list[bytes]", self.r.lrange(self._chan_key(channel, "d"), start, start + count - 1))   # bytes

    def channel_reset(self, channels: Sequence[int]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for c in channels:
            pipe.delete(self._chan_key(c, "w"))
        return [bool(n) for n in pipe.execute()]

    # -- request queue ------------------------------------------------------
    def enqueue(self, request: bytes) -> None:
        self.r.rpush(self._queue, request)

    def dequeue(self, timeout: float = 0.0) -> bytes | None:
        if timeout > 0:
            item = cast("tuple[bytes, bytes] | None", self.r.blpop([self._queue], timeout=timeout))   # bytes
            return item[1] if item else None
        return cast("bytes | None", self.r.lpop(self._queue))   # bytes

    def queued(self) -> int:
        return int(self.r.llen(self._queue))

    # -- shared file pointers -----------------------------------------------
    def shared_pointer(self, path: str, token: str, delta: int = 0) -> int:
        return int(self.r.incrby(self._key(file_id(path), f"sfp:{token}"), delta)) - delta

    def set_shared_pointer(self, path: str, token: str, value: int) -> None:
        self.r.set(self._key(file_id(path), f"sfp:{token}"), value)

    def drop_shared_pointer(self, path: str, token: str) -> None:
        self.r.delete(self._key(file_id(path), f"sfp:{token}"))

    # -- I/O statistics -----------------------------------------------------
    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        args: list = []
        for name, value in counters.items():
            args += [f"{path}\0{who}\0{name}", int(value)]
        if args:
            self._stats_add(keys=[self._stats], args=args)

    def stats_log(self, event: Mapping[str, Any]) -> None:
        self._stats_push(keys=[self._stats_log], args=[json.dumps(event)])

    def stats(self) -> tuple[dict[str, dict[str, dict[str, int]]], list[dict[str, Any]]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self._stats)
        pipe.lrange(self._stats_log, 0, -1)
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
        pipe.exists(self._stats, self._stats_log)
        keys, stats = pipe.execute()
        return keys == stats

    def close(self) -> None:
        self._sockets.close()
        self.r.close()


@_public_methods_translated
class RedisBatchWriter(BatchWriter):
    """Pipelined commits on a connection of their own (see :class:`~mpiburst.store.base.BatchWriter`).

    The payload goes from the caller's memory to ``sendall`` untouched
    (:func:`~mpiburst.store.resp.resp_frames`), so a writer can fill its next
    batch while the server stores this one.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._conn: Any = borrow(store.r.connection_pool)
        self._tmp: str | None = None

    def send(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]]) -> None:
        tmp, commands = self.store._pack_commit(path, channel, payload, extents)
        self.store._ensure_loaded()
        try:
            self._conn.send_packed_command(resp_frames(commands), check_health=False)
        except BaseException:
            self._conn.disconnect()
            raise
        self._tmp = tmp

    def finish(self) -> int:
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            raise RuntimeError("finish() without a batch in flight")
        replies: list = []
        try:
            for _ in range(2):
                try:
                    replies.append(self._conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._conn.disconnect()  # a half-read reply stream must not be reused
            raise
        return self.store._commit_result(tmp, replies)

    def close(self) -> None:
        if self._conn is not None:
            self.store.r.connection_pool.release(self._conn)
            self._conn = None


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
        writers=int(g.get("writers", 0)),
        settled=int(g.get("settled", 0)),
        settled_size=int(g.get("settled_size", 0)),
        truncs=int(g.get("truncs", 0)),
        settled_truncs=int(g.get("settled_truncs", 0)),
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


def _parse_strided(raw: list) -> Iterator[Strided]:
    """Yield the strided runs of a raw ``ZRANGE…WITHSCORES`` reply on the strided index (RESP2 or RESP3)."""
    pairs = raw if raw and isinstance(raw[0], list) else zip(raw[::2], raw[1::2])
    for member, score in pairs:
        seq, boff, length, blob, count, stride = member.split(b":")
        yield Strided(int(seq), int(score), int(length), int(blob), int(boff), int(count), int(stride))


def _entries(raw: list, rawv: list) -> list[Entry]:
    """Return the entries of the two index replies, in offset order (plain ones only: as the server sent them)."""
    plain = list(_parse_extents(raw))
    if not rawv:
        return list(plain)
    return sorted([*plain, *_parse_strided(rawv)], key=_order)


def _order(e: Entry) -> tuple[int, bytes]:
    """The index order: by offset, then by member (as the server orders ties at one score)."""
    return e.start, f"{e.seq}:{e.boff}:{e.length}:{e.blob}".encode()


def _blocks(entries: list[Entry], lo: int, hi: int) -> list[Extent]:
    """Return ``entries`` (in offset order) with strided runs expanded to their blocks overlapping ``[lo, hi)``."""
    if not any(isinstance(e, Strided) for e in entries):
        return entries  # type: ignore[return-value]
    return sorted((b for b in expand(entries, lo, hi) if b.end > lo), key=_order)


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
