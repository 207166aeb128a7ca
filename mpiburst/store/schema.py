"""The key schema, Lua scripts and codec of the Redis-protocol stores: what the server holds, and how it is read.

:class:`~mpiburst.store.redis_store.RedisStore` (one server) and
:class:`~mpiburst.store.cluster_store.ClusterStore` (one server per node, each
node's data in a shard that is a ``RedisStore`` under a prefix of its own)
both name their keys with :class:`Keys`, run these scripts and decode the
server's replies with these functions; nothing else knows the layout.

Layout of a single-server run (every key of one file shares the hash tag
``{fid}``, every key of one channel the tag ``{chan:C}``). Every name starts
with the store's prefix, ``mpb:`` here; a shard of a cluster store
(:mod:`mpiburst.store.cluster_store`) uses ``mpb:{<node tag>}:`` instead, so
all of its keys hash to one slot of its own server::

    mpb:files            hash   fid -> BFS path          (registry, for ls / auto engine)
    mpb:{fid}:m          hash   path, size, seq, clean, pending, trunc, pinned, bfs (1, 0, or ? when
                                made unlooked), staged, umask,
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
    mpb:{fid}:p          hash   token -> the shared file pointer of one open of the file (HINCRBY)
    mpb:{chan:C}:d       list   a channel's bytes, in pieces
    mpb:{chan:C}:m       hash   bytes, stores (present = the channel was used)
    mpb:{chan:C}:w       string writer token; present = the channel is open
    mpb:queue            list   requests for the automatic engine (JSON)
    mpb:stats            hash   "path\0process\0counter" -> integer (I/O statistics)
    mpb:stats:log        list   events (JSON), one per flush

A cluster store's layout is drawn in :mod:`mpiburst.store.cluster_store`:
each shard is this layout under ``mpb:{<node tag>}:``, the home's records
under ``mpb:{<tag of node 0>}:g:``, plus the global sequence counter
(:meth:`Keys.counter`) and the scripts :data:`RESERVE` and :data:`FENCE`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

from ..overlay import Entry, Extent, Strided
from .base import Blob, FileMeta, batch_end, file_id, index_order

#: The key prefix of a single-server run.
PREFIX = "mpb:"
#: Members per ZADD inside Lua (stays far below Lua's stack limit), and per ZREM of a clean-up.
ZADD_CHUNK = 1000


class Keys:
    """The key names of one store: every name starts with its prefix (see the module docstring).

    Parameters
    ----------
    prefix
        ``mpb:`` for a single server; a cluster shard's ``mpb:{tag}:`` puts
        every key of the shard in one slot of its own server.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        #: The registry of files (fid -> BFS path).
        self.files = prefix + "files"
        #: The automatic engine's request queue.
        self.queue = prefix + "queue"
        #: I/O statistics: counters and the event log (not data: ``empty`` ignores them).
        self.stats = prefix + "stats"
        self.stats_log = prefix + "stats:log"

    def file(self, fid: str, part: str) -> str:
        """Return the key of one part of file ``fid`` (``m``, ``x``, ``v``, ``B``, ``lock``, ``b:<n>``, ``t:<t>``, ``p``)."""
        return f"{self.prefix}{{{fid}}}:{part}"

    def channel(self, channel: int, part: str) -> str:
        """Return the key of one part of channel ``channel`` (``d``, ``m``, ``w``)."""
        return f"{self.prefix}{{chan:{channel}}}:{part}"

    def temporary(self, path: str) -> str:
        """Return a fresh key for a batch's payload in flight (renamed to its blob by :data:`COMMIT`)."""
        return self.file(file_id(path), "t:" + secrets.token_hex(8))

    def truncation(self, fid: str) -> list[str]:
        """Return the keys :data:`TRUNCATE` takes (record, plain index, strided index)."""
        return [self.file(fid, "m"), self.file(fid, "x"), self.file(fid, "v")]

    @staticmethod
    def counter(tag: str) -> str:
        """Return the key of a cluster's global sequence counter, on the server owning ``tag``'s slot."""
        return f"mpb:{{{tag}}}:seq"


def shard_prefix(tag: str) -> str:
    """Return the key prefix of a cluster node's shard: every key in the slot of ``tag``, owned by its server."""
    return f"mpb:{{{tag}}}:"


def home_prefix(tag: str) -> str:
    """Return the key prefix of a cluster's home (the file records, on node 0 whose tag is ``tag``)."""
    return f"mpb:{{{tag}}}:g:"


def commit_keys_args(keys: Keys, path: str, tmp: str, channel: int, nbytes: int, extents: Sequence[Sequence[int]],
                     staged: bool, base: int | None, closing: bool = False) -> tuple[list[str], list]:
    """Return the KEYS and ARGV of :data:`COMMIT` for one batch whose payload is (or will be) at ``tmp``.

    ``base``: the batch's first sequence number, taken elsewhere (a cluster
    store's global counter) instead of from the file's record; the script
    then refuses it (``STALE``) if it is not above the record's ``fence``.
    ``closing``: the batch is the last of a writing handle, which the
    script counts out of the file's writers once the batch is stored
    (:meth:`~mpiburst.store.BatchWriter.send`).
    """
    fid = file_id(path)
    strided: list = []
    plain: list = []
    for i, e in enumerate(extents):
        if len(e) > 3 and e[3] > 1:
            strided += (i, e[3], e[4])
        plain += (e[0], e[1], e[2])
    args: list = [keys.file(fid, "b:"), len(extents), batch_end(extents), nbytes, channel, int(staged),
                  "" if base is None else base, int(closing), len(strided) // 3, *strided, *plain]
    return [keys.file(fid, "m"), keys.file(fid, "x"), keys.file(fid, "B"), tmp, keys.file(fid, "v")], args


#: The record's ``bfs`` field of a file made without looking at the BFS (:attr:`FileMeta.unlooked`).
UNLOOKED = "?"

# ----------------------------------------------------------------------------- Lua scripts

# Remove a file's keys, found from its record's parts (no scan of the keyspace): KEYS[1] its batches (whose
# members name the blob keys, ARGV[1] .. id), KEYS[2..n-1] the other parts, KEYS[n] the registry (field ARGV[2]).
# A batch in flight (t:<token>) is not among them: its commit finds no record and its writer removes it.
DROP = """
local blobs = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #blobs, %d do
  local batch = {}
  for j = i, math.min(i + %d, #blobs) do
    batch[#batch + 1] = ARGV[1] .. string.match(blobs[j], '^(-?%%d+):')
  end
  redis.call('UNLINK', unpack(batch))
end
for i = 1, #KEYS - 1 do redis.call('UNLINK', KEYS[i]) end
redis.call('HDEL', KEYS[#KEYS], ARGV[2])
return #blobs
""" % (ZADD_CHUNK, ZADD_CHUNK - 1)  # noqa: UP031 - str.format would need every Lua brace doubled

# Join what the BFS holds to a record made unlooked (its bfs field '?'), once: ARGV[1] the BFS file's size, '' if
# there is none; the size and settled size become the larger. Returns the record ({} if there is none).
FOUND_ON_BFS = """
if redis.call('HGET', KEYS[1], 'bfs') == '?' then
  if ARGV[1] == '' then
    redis.call('HSET', KEYS[1], 'bfs', '0')
  else
    local n = tonumber(ARGV[1])
    redis.call('HSET', KEYS[1], 'bfs', '1')
    if tonumber(redis.call('HGET', KEYS[1], 'size') or '0') < n then redis.call('HSET', KEYS[1], 'size', n) end
    if tonumber(redis.call('HGET', KEYS[1], 'settled_size') or '0') < n then
      redis.call('HSET', KEYS[1], 'settled_size', n)
    end
  end
end
return redis.call('HGETALL', KEYS[1])
"""

COMMIT = """
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
local k = tonumber(ARGV[9])
local strided = {}
for j = 0, k - 1 do strided[tonumber(ARGV[10 + 3 * j])] = 11 + 3 * j end
local p = 10 + 3 * k
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
if ARGV[8] == '1' and redis.call('HINCRBY', KEYS[1], 'writers', -1) < 0 then redis.call('HSET', KEYS[1], 'writers', 0) end
return base
""" % (2 * ZADD_CHUNK, 2 * ZADD_CHUNK)  # noqa: UP031 - str.format would need every Lua brace doubled

# Clip the index at a new size: drop extents past it, shorten the one across it.
TRUNCATE = """
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
ALLOW_OOM = "#!lua flags=allow-oom\n"

# Add counters (ARGV: name, value, name, value, ...) to the statistics hash.
STATS_ADD = """
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 0
"""

# Append one event to the statistics log (the engine samples a full tier too).
STATS_LOG_PUSH = """
redis.call('RPUSH', KEYS[1], ARGV[1])
return 0
"""

# Take a file's flush lease.
LEASE = """
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
"""

# Extend a lease, only for its holder.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Record the snapshot a flush takes; return the file's record.
BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HSET', KEYS[1], 'pending', redis.call('HGET', KEYS[1], 'seq') or '0')
return redis.call('HGETALL', KEYS[1])
"""

# LEASE, then BEGIN if the lease was taken (KEYS[1]: the record, KEYS[2]: the lease): 0 when another holds it.
LEASE_BEGIN = """
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end""" + BEGIN

# Mark a flush snapshot clean, but only for the flush that holds the lease.
MARK_CLEAN = """
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
RELEASE = """
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
CUT = """
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
_COUNT_WRITER = """
local n = redis.call('HINCRBY', KEYS[1], 'writers', ARGV[1])
if n < 0 then
  redis.call('HSET', KEYS[1], 'writers', 0)
  n = 0
end
if n <= tonumber(ARGV[2]) then
  local m = redis.call('HMGET', KEYS[1], 'seq', 'size', 'truncs')
  redis.call('HSET', KEYS[1], 'settled', m[1] or 0, 'settled_size', m[2] or 0, 'settled_truncs', m[3] or 0)
end
"""

WRITERS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
""" + _COUNT_WRITER + """
return n
"""

# Make a file's record unless it exists (each field set only where absent), register it, and with ARGV[1]
# and ARGV[2] (1, 1) count a writer as WRITERS does, in one step. KEYS[1] the record, KEYS[2] the registry;
# ARGV[3] the file id; then field, value pairs. Returns the record.
CREATE = """
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], ARGV[3], redis.call('HGET', KEYS[1], 'path'))
if ARGV[1] ~= '0' then
""" + _COUNT_WRITER + """
end
return redis.call('HGETALL', KEYS[1])
"""

# Close a channel only for the writer that opened it (a reset may have taken it meanwhile).
CHANNEL_CLOSE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# The home of a cluster hands out a batch's sequence numbers: KEYS[1] the record, KEYS[2] the global counter;
# ARGV: number of extents, end offset, the node's mark ("@<i>"), staged ("1": no numbers, 0).
# Metadata may grow on a full home: the data's memory is the writer's node's.
RESERVE = ALLOW_OOM + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOFILE the file has no record in the tier') end
redis.call('HSET', KEYS[1], ARGV[3], '1')
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
if tonumber(ARGV[2]) > size then redis.call('HSET', KEYS[1], 'size', ARGV[2]) end
if ARGV[4] == '1' then return 0 end
local last = redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'seq', last)
return last - tonumber(ARGV[1]) + 1
"""

# Raise a cluster shard record's fence (KEYS[1]) to ARGV[1]; a node marked for the file with no record yet (its
# first batch numbered, not yet indexed) gets one (ARGV[2]: the path), so that batch too is refused and numbered anew.
FENCE = ALLOW_OOM + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'path', ARGV[2], 'fence', ARGV[1])
  return 0
end
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') then
  redis.call('HSET', KEYS[1], 'fence', ARGV[1])
end
return 1
"""


# ----------------------------------------------------------------------------- codec of the server's replies

def meta_from(raw: dict) -> FileMeta:
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
        unlooked=g.get("bfs") == UNLOOKED,
        umask=int(g["umask"]) if "umask" in g else None,
        writers=int(g.get("writers", 0)),
        settled=int(g.get("settled", 0)),
        settled_size=int(g.get("settled_size", 0)),
        truncs=int(g.get("truncs", 0)),
        settled_truncs=int(g.get("settled_truncs", 0)),
    )


def parse_extents(raw: list) -> Iterator[Extent]:
    """Yield the extents of a raw ``ZRANGE…WITHSCORES`` reply on an index (RESP2 or RESP3).

    Parsed here, not by redis-py's score callback, which cost a third of a
    flush's index reads: this runs once per extent of every read and flush.
    """
    pairs = raw if raw and isinstance(raw[0], list) else zip(raw[::2], raw[1::2])
    for member, score in pairs:
        seq, boff, length, blob = member.split(b":")
        yield Extent(int(seq), int(score), int(length), int(blob), int(boff))


def parse_strided(raw: list) -> Iterator[Strided]:
    """Yield the strided runs of a raw ``ZRANGE…WITHSCORES`` reply on the strided index (RESP2 or RESP3)."""
    pairs = raw if raw and isinstance(raw[0], list) else zip(raw[::2], raw[1::2])
    for member, score in pairs:
        seq, boff, length, blob, count, stride = member.split(b":")
        yield Strided(int(seq), int(score), int(length), int(blob), int(boff), int(count), int(stride))


def entries(raw: list, rawv: list) -> list[Entry]:
    """Return the entries of the two index replies, in offset order (plain ones only: as the server sent them)."""
    plain = list(parse_extents(raw))
    if not rawv:
        return list(plain)
    return sorted([*plain, *parse_strided(rawv)], key=index_order)



def blob_member(b: Blob) -> str:
    """Return the member of blob ``b`` in a file's ``B`` index."""
    return f"{b.blob}:{b.extents}:{b.bytes}:{b.channel}"


def parse_blob(member: bytes, score: float) -> Blob:
    """Return the :class:`Blob` of one member of a file's ``B`` index and its score (the blob's last seq)."""
    blob, n, nbytes, chan = (int(v) for v in member.split(b":"))
    return Blob(blob, int(score), n, nbytes, chan)


def blob_of(member: bytes, strided: bool = False) -> int:
    """Return the blob id of a member of the plain (``x``) or strided (``v``) index."""
    return int(member.split(b":")[3]) if strided else int(member.rsplit(b":", 1)[1])

