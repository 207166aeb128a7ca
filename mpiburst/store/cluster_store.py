"""The tier store of a multi-node run: one Valkey/Redis cluster, one server per node, writes kept on their node.

A :class:`ClusterStore` holds one :class:`~mpiburst.store.redis_store.RedisStore`
per node (a *shard*) over that node's server, plus the *home*: the file
records, on node 0. The cluster routes nothing for us: every key carries the
hash tag of a slot its server owns, so each client talks to its own server
only and every script stays inside one slot.

Layout (``T<i>``: node ``i``'s tag, the first of ``n<i>.0``, ``n<i>.1``, ...
whose slot server ``i`` owns, found by asking it; every process finds the
same one)::

    node 0, the home (records, leases, queue, event log, shared pointers):
    mpb:{T0}:seq              string the global sequence counter
    mpb:{T0}:g:files          hash   fid -> BFS path (the registry)
    mpb:{T0}:g:{fid}:m        hash   the file's record (as a single server's) plus
                                     "@<i>" = 1 for every node i that took sequence numbers for it
    mpb:{T0}:g:{fid}:lock     string the flush lease
    mpb:{T0}:g:{fid}:p        hash   the shared file pointers (token -> value)
    mpb:{T0}:g:queue, mpb:{T0}:g:stats:log

    every node i, the shard (the data its ranks wrote):
    mpb:{Ti}:stats            hash   its processes' I/O counters (they survive a lost node 0)
    mpb:{Ti}:{fid}:m          hash   path, seq (highest here), fence, staged
    mpb:{Ti}:{fid}:x, B, b:<blob>, t:<token>    as a single server's index, batches and payloads
    mpb:{Ti}:{chan:C}:d, m, w                   the channels of node i's ranks

**Node-local writes.** A batch's payload goes to the writer's own server
(``SET`` of a temporary key); then the home hands out its sequence numbers
(one small script: ``INCRBY`` of the global counter, the record's ``seq``
and ``size``, the node's ``@i`` mark); then the shard's commit script indexes
it at those numbers. No payload byte crosses nodes when written; a shared
file's data lies on the nodes that wrote it, and reads, the flush and
residency ask just the nodes its record marks.

**Arrival order.** Sequence numbers come from one counter: a batch issued
after another completed takes a higher number, whichever nodes they went to,
so later writes win as on one server. Blob ids are the batch's first number
(staged batches: a per-node negative count), so :class:`Extent` and
:class:`Blob` ids here are ``local id * nodes + node``: they name the node.

**Fences.** Taking numbers and indexing are two steps on two servers, so a
batch may be indexed after a flush began or a truncation ran although its
numbers are older. Each shard record has a *fence*: its commit script
refuses numbers at or below it (``STALE``) and the writer takes new numbers
(the batch then counts as arriving after). :meth:`ClusterStore.begin` fences
every marked node at the snapshot ``pending`` before the flush reads any
index, :meth:`ClusterStore.mark_clean` at ``upto``, :meth:`ClusterStore.set_size`
at the record's ``seq`` (atomically with the clip), and a shard record is
created with the fence at the counter's value. A node marked for the file
whose first batch was numbered but not yet indexed has no record to fence:
raising its fence creates the record, so that batch is refused too. So no extent with a number at
or below a snapshot appears on any node once its flush has begun: a flush
never marks clean what it did not read.

**The consistent cut.** Every record lives on the home and the home's
numbering script updates the record as it hands the numbers out, so
:meth:`ClusterStore.cut` is the single server's one-script read of every
record: a batch completed before the cut took its numbers before it, so they
are at most its file's ``seq`` in the cut; a batch issued after takes higher
ones. A batch in flight during the cut either was indexed before its file's
flush began (and is flushed) or is refused by the fence and numbered anew
(above the cut): either is a valid place for a write concurrent with the
cut. Hence if a batch B issued after A completed is in the cut, so is A.

**Errors.** A server that cannot be reached raises
:class:`~mpiburst.errors.NodeLostError` (a ``TierConnectionError``) naming
its node, and for a node other than 0 the files whose data it held (node 0
holds every record).
"""

from __future__ import annotations

import functools
import heapq
import inspect
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple, TypeVar, cast

import redis
from redis.crc import key_slot

from ..errors import MpiburstError, NodeLostError, ReplicaError, ServerError, TierConnectionError
from ..overlay import Entry, Extent, Strided, overlapping
from . import schema
from .base import (
    BatchWriter,
    Blob,
    ChannelState,
    FileMeta,
    NewFile,
    Payload,
    Placement,
    RecordGone,
    StaleNumbers,
    Store,
    batch_end,
    file_id,
)
from .connections import borrow
from .redis_errors import as_mpiburst_error, public_methods_translated
from .redis_store import RedisStore
from .resp import resp_frames

_C = TypeVar("_C", bound=type)

#: How many times a batch is numbered anew when flushes or truncations keep overtaking it.
RETRIES = 100
#: Seconds a process waits for a lost node's replica to be promoted (the cluster's node timeout is 5 s).
FAILOVER_WAIT = 20.0
#: Seconds a connection to a lost node's server may take before it counts as not refused (not certainly dead).
DEAD_PROBE = 1.0
#: How far the sequence counter moves when node 0's replica takes over: more than the lost home can have handed
#: out since its replica's last copy, and far below 2**53 (numbers are sorted-set scores, exact as doubles).
COUNTER_GAP = 1 << 32
#: Seconds :meth:`ClusterStore.confirm` waits for a replica to confirm a write.
CONFIRM_TIMEOUT = 10.0
#: Payload bytes a process keeps of the batches it pushed since its last :meth:`ClusterStore.confirm`, to send
#: them again to a lost node's promoted replica; past it, the next batch first waits for the replicas (a confirm).
RESEND_BYTES = 64 << 20
#: Candidate tags asked of a server at once when looking for one of its slots.
_PROBE = 64


class Pushed(NamedTuple):
    """A batch this process pushed since its last confirm: what :meth:`ClusterStore.confirm` may yet have to resend."""

    path: str
    channel: int
    payload: bytes
    extents: list[Sequence[int]]
    node: int          # the node that holds its payload and index
    base: int          # its first sequence number (and the node's blob id)

    @property
    def last(self) -> int:
        """Its last sequence number."""
        return self.base + len(self.extents) - 1


class FailedOver(TierConnectionError):
    """A node's replica took over while a store call ran on it: the call is run again (see :func:`_failover_retried`)."""

    def __init__(self, node: int) -> None:
        super().__init__(f"node {node}'s replica took over; run the call again.")
        self.node = node


def _moved(exc: BaseException) -> bool:
    """Return True for a ``MOVED`` reply: the server is no longer primary of the slot (its replica took over)."""
    return isinstance(exc, redis.exceptions.AskError) or str(exc).startswith("MOVED ")


def _failover_retried(cls: _C) -> _C:
    """Class decorator: run a public method again when a node's replica took over during it (:class:`FailedOver`).

    Every store method may be run again: a batch numbered twice leaves a gap
    in the numbers, a batch stored twice is one the first run never indexed.
    Generators are not wrapped: their caller sees :class:`FailedOver` (a
    :class:`TierConnectionError`) and may ask again.
    """
    def retried(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: ClusterStore, *args: Any, **kwargs: Any) -> Any:
            for _ in range(len(self.clients)):
                try:
                    return method(self, *args, **kwargs)
                except FailedOver:
                    continue
            return method(self, *args, **kwargs)
        return run

    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value) and not inspect.isgeneratorfunction(value):
            setattr(cls, name, retried(value))
    return cls


def _bytes_in(e: Entry, lo: int, hi: int) -> int:
    """Return how many of entry ``e``'s bytes lie in ``[lo, hi)``."""
    if isinstance(e, Strided):
        i, j = e.span(lo, hi)
        if i >= j:
            return 0
        first, last = e.start + i * e.stride, e.start + (j - 1) * e.stride   # only these two may be cut
        return (j - i) * e.length - max(0, lo - first) - max(0, last + e.length - hi)
    return max(0, min(e.end, hi) - max(e.start, lo))


def slot_tag(node: int, slots: Sequence[int]) -> str:
    """Return node ``node``'s hash tag computed from its slot range ``[first, last]``: what :func:`node_tag` finds."""
    first, last = slots
    for k in range(16 * _PROBE * 64):
        tag = f"n{node}.{k}"
        if first <= key_slot(tag.encode()) <= last:
            return tag
    raise ServerError(f"node {node} has no usable hash slot in {first}-{last}; form the cluster again.")


def node_tag(client: redis.Redis, node: int) -> str:
    """Return node ``node``'s hash tag: the first ``n<node>.<k>`` whose slot ``client``'s server owns.

    Asked of the server (a key of a slot it does not own gets a ``MOVED``
    reply), so any slot assignment works and every process finds the same tag.

    Raises
    ------
    ServerError
        If the server owns none of the slots tried (it owns no slot at all).
    """
    for first in range(0, 16 * _PROBE * 64, _PROBE):
        tags = [f"n{node}.{k}" for k in range(first, first + _PROBE)]
        pipe = client.pipeline(transaction=False)
        for tag in tags:
            pipe.exists(f"mpb:{{{tag}}}:probe")
        for tag, reply in zip(tags, pipe.execute(raise_on_error=False)):
            if not isinstance(reply, Exception):
                return tag
            # MOVED or ASK: not its slot (an AskError or its subclass MovedError; redis-py 5.0 gives
            # a plain ResponseError with the reply's text)
            if not (isinstance(reply, redis.exceptions.AskError) or str(reply).startswith(("MOVED ", "ASK "))):
                raise reply
    raise ServerError(f"the server of node {node} owns no hash slot of the cluster; form the cluster again.")


@_failover_retried
@public_methods_translated
class ClusterStore(Store):
    """The tier store over a cluster of one server per node (see the module docstring).

    Parameters
    ----------
    clients
        One authenticated redis-py client per node, in node order (node 0
        holds the file records).
    local
        This process's node index: its writes go to that node's server.
        None for a process on no node (the CLI): its writes go to node 0.
    ranks
        Optionally ``[lo, hi)`` of the ranks (channels) of each node: a
        channel lives on its rank's node. Without it channel ``C`` lives on
        node ``C mod nodes``.
    slots
        Optionally each node's slot range ``[first, last]`` (the run conf's):
        the tags are then computed here instead of asked of every server,
        so a store can be made while a node other than 0 is down.
    replicas
        Optionally a client per node (None: no replica) of that node's
        replica server, on another node: when a node is lost its promoted
        replica serves its keys (:meth:`_promote`), and :meth:`confirm` waits
        for writes to be on both.
    """

    def __init__(self, clients: Sequence[redis.Redis], local: int | None,
                 ranks: Sequence[Sequence[int]] | None = None,
                 slots: Sequence[Sequence[int]] | None = None,
                 replicas: Sequence[redis.Redis | None] | None = None) -> None:
        if not clients:
            raise ValueError("a cluster store needs at least one server")
        self.clients = list(clients)
        self.replicas: list[redis.Redis | None] = list(replicas or [])
        #: Nodes now served by their promoted replica.
        self.failed_over: set[int] = set()
        #: Nodes this process wrote to since its last :meth:`confirm` (a WAIT on each), and those of them written
        #: other than by a batch (what a failover may lose of those is not kept to be sent again).
        self._unconfirmed: set[int] = set()
        self._unconfirmed_other: set[int] = set()
        self._lost_writes: set[int] = set()
        #: The batches pushed since the last :meth:`confirm` (only with replicas), in the order they were numbered.
        self.pushed: list[Pushed] = []
        self._pushed_bytes = 0
        self._resending = False
        self._failover_lock = threading.RLock()   # one failover at a time; a resend's calls may need another
        self.local = local
        self.ranks = [tuple(r) for r in ranks] if ranks else None
        self.tags: list[str] = []
        for i, client in enumerate(self.clients):
            if slots:  # the run conf's slot ranges: no server asked, so a dead node's tag is known too
                self.tags.append(slot_tag(i, slots[i]))
                continue
            with self._on(i):
                self.tags.append(node_tag(client, i))
        self.shards = [RedisStore(c, prefix=schema.shard_prefix(t)) for c, t in zip(self.clients, self.tags)]
        self.home = RedisStore(self.clients[0], prefix=schema.home_prefix(self.tags[0]))
        self._counter = schema.Keys.counter(self.tags[0])
        self._confirmed = [schema.shard_prefix(t) + "confirmed" for t in self.tags]   # the marker :meth:`confirm` writes
        self._reserve = self.clients[0].register_script(schema.RESERVE)
        self._fence = [c.register_script(schema.FENCE) for c in self.clients]
        #: Payload bytes this process has fetched from each node's server (:meth:`fetch_into`), in node order.
        self.read_bytes = [0] * len(self.clients)

    @property
    def nodes(self) -> int:
        """The number of nodes (servers)."""
        return len(self.clients)

    # -- helpers ------------------------------------------------------------
    def _writer_node(self) -> int:
        """Return the node this process's batches go to."""
        return self.local if self.local is not None else 0

    def _where(self, node: int) -> str:
        """Return a server's address for messages."""
        kw = self.clients[node].connection_pool.connection_kwargs
        return kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"

    @contextmanager
    def _on(self, node: int, write: bool = True, redone: bool = False) -> Iterator[None]:
        """Turn a lost connection to ``node``'s server into an error naming the node (and its files).

        With a replica, a lost node's replica is taken on instead once it is
        promoted (:meth:`_promote`) and :class:`FailedOver` is raised: the
        public method that was running is run again on it. ``write``: what
        runs may change the server's data (:meth:`confirm` then waits for it
        to be on the replica too). ``redone``: a write whose loss with the
        server is made good without the caller: a step of storing a batch
        (:attr:`pushed` keeps it to send again), a flush's lease, fence,
        clean mark or freed batches (lost, the next flush does that work
        again), statistics. Other writes lost with a server make the next
        :meth:`confirm` raise.
        """
        client = self.clients[node]
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OSError, TierConnectionError) as exc:
            if not isinstance(exc, FailedOver) and self._promote(node, client):
                raise FailedOver(node) from None
            raise self._lost(node, exc) from None
        except redis.RedisError as exc:
            if _moved(exc) and self._promote(node, client):
                raise FailedOver(node) from None
            raise as_mpiburst_error(exc) from None
        if write or redone:
            self._unconfirmed.add(node)
            if not redone:
                self._unconfirmed_other.add(node)

    def promote(self, node: int) -> bool:
        """Serve ``node``'s keys from its replica once the cluster promoted it (a process that starts after a
        node was lost); return False if it has no replica or it is not promoted within :data:`FAILOVER_WAIT`."""
        return self._promote(node)

    def _promote(self, node: int, failed: redis.Redis | None = None) -> bool:
        """Take on ``node``'s replica once it serves as primary; return False if it has none or it cannot.

        The cluster promotes the replica of a failed primary itself when a
        majority of primaries agrees (3 nodes or more; within about
        ``cluster-node-timeout`` plus a second). This waits for that, at most
        :data:`FAILOVER_WAIT` seconds. With two nodes there is no majority:
        this process promotes the replica (``CLUSTER FAILOVER TAKEOVER``),
        but only once the primary is certainly dead (:meth:`_dead`). The
        batches this process pushed since its last :meth:`confirm` that the
        replica does not hold are sent to it again (:meth:`_resend`); other
        writes this process made to the lost server since then may not have
        reached the replica: the next :meth:`confirm` raises :class:`NodeLostError`.

        ``failed``: the client that lost its server. Threads of one process
        (a commit's) share the store: one takes the replica on while the
        others wait here, then run their calls again on it (True).
        """
        with self._failover_lock:
            if failed is not None and self.clients[node] is not failed:
                return True   # another thread took the replica on meanwhile
            return self._promote_alone(node)

    def _promote_alone(self, node: int) -> bool:
        """:meth:`_promote`, under its lock."""
        replica = self.replicas[node] if node < len(self.replicas) else None
        if replica is None or node in self.failed_over:
            return False
        deadline = time.monotonic() + FAILOVER_WAIT
        taken = False
        while True:
            try:
                if replica.info("replication").get("role") == "master":
                    break
                if len(self.clients) == 2 and not taken and self._dead(node):
                    taken = True   # no majority to promote it: this process does, the primary being dead
                    with suppress(redis.ResponseError):   # another process was first: it is no replica now
                        replica.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            except (redis.RedisError, OSError):
                return False   # its partner is gone too
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        if node in self._unconfirmed_other:
            self._lost_writes.add(node)
        self._take_on(node, replica)
        self._resend(node)
        return True

    def _resend(self, node: int) -> None:
        """Send again each batch of :attr:`pushed` that ``node``'s promoted replica may lack (see :meth:`_held`).

        A batch the replica lacks is stored and numbered anew: above any
        flush's snapshot taken meanwhile (a flush never marks it clean unread)
        and, the batches being sent again in the order they were first
        numbered, after this process's earlier writes as before. So it counts
        as arriving now: where it overlaps a write another process made since
        without a sync between them (MPI leaves that outcome undefined), it wins.
        """
        pushed, self.pushed, self._pushed_bytes = self.pushed, [], 0
        self._resending = True
        try:
            for p in pushed:
                if node in (0, p.node) and not self._held(node, p):
                    with suppress(RecordGone):   # the file was deleted meanwhile
                        self.commit(p.path, p.channel, p.payload, p.extents)   # kept again, numbered anew
                else:
                    self._keep(p)
        finally:
            self._resending = False

    def _held(self, node: int, p: Pushed) -> bool:
        """Return True if ``node``'s promoted replica holds batch ``p`` as its lost server did.

        On the batch's own node: its payload is there (the commit script
        stores the payload, its index and the record's numbers at once, and a
        replica holds a prefix of its primary's writes). On the home (node 0,
        the batch's payload elsewhere): the record has the batch's numbers
        (its ``seq`` reached them, from one counter) and its node's mark.
        """
        for _ in range(len(self.clients)):
            try:
                fid = file_id(p.path)
                if p.node == node:
                    with self._on(node, write=False):
                        return bool(self.clients[node].exists(self.shards[node].keys.file(fid, f"b:{p.base}")))
                with self._on(0, write=False):
                    seq, mark = self.clients[0].hmget(self.home.keys.file(fid, "m"), ["seq", f"@{p.node}"])
                return mark is not None and int(seq or 0) >= p.last
            except FailedOver:
                continue   # yet another node lost meanwhile: ask its replica
        return False

    def _keep(self, p: Pushed) -> None:
        """Add ``p`` to :attr:`pushed`; past :data:`RESEND_BYTES`, wait for the replicas (:meth:`confirm`) first."""
        self.pushed.append(p)
        self._pushed_bytes += len(p.payload)
        if self._pushed_bytes > RESEND_BYTES and not self._resending:
            self.confirm()

    def _dead(self, node: int) -> bool:
        """Return True only if ``node``'s server is certainly gone: a new connection to it is refused.

        A server that is stopped (SIGSTOP) or cut off still accepts a
        connection or lets it time out: it is never taken for dead, so
        mpiburst never makes a second primary beside a live one.
        """
        kw = self.clients[node].connection_pool.connection_kwargs
        family, address = ((socket.AF_UNIX, kw["path"]) if kw.get("path") else
                           (socket.AF_INET6 if ":" in str(kw.get("host")) else socket.AF_INET,
                            (kw.get("host"), kw.get("port"))))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(DEAD_PROBE)
            try:
                probe.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                return True
            except OSError:
                return False
        return False

    def _take_on(self, node: int, client: redis.Redis) -> None:
        """Serve ``node``'s keys from ``client`` (its promoted replica) from now on."""
        old, self.clients[node] = self.clients[node], client
        self.failed_over.add(node)
        self.shards[node] = RedisStore(client, prefix=schema.shard_prefix(self.tags[node]))
        self._fence[node] = client.register_script(schema.FENCE)
        if node == 0:
            self.home = RedisStore(client, prefix=schema.home_prefix(self.tags[0]))
            self._reserve = client.register_script(schema.RESERVE)
            # Numbers the lost home handed out after its replica's last copy must never be handed out again (a
            # batch indexed late with one would share its number, and blob, with a newer one): every process
            # that takes the promoted home on first moves the counter past them.
            with self._on(0, write=False):
                client.incrby(self._counter, COUNTER_GAP)
        with suppress(redis.RedisError, OSError):
            old.close()

    def confirm(self, timeout: float | None = None) -> None:
        """Return once every write this process made since its last call is on two servers (see :meth:`Store.confirm`).

        For each node written to: a marker write, then ``WAIT 1`` on the same
        connection, which covers every earlier write to that server. A node
        whose replica took over holds the only copy of its data now: nothing
        is waited for there.

        Raises
        ------
        NodeLostError
            If a node was lost after this process wrote to it and before those
            writes were confirmed (they may not have reached its replica).
        ReplicaError
            If a replica does not confirm within ``timeout`` seconds (default
            :data:`CONFIRM_TIMEOUT`).
        """
        if not any(self.replicas):
            self._unconfirmed.clear()
            self._unconfirmed_other.clear()
            return
        wait_ms = int(1000 * (CONFIRM_TIMEOUT if timeout is None else timeout))
        for node in sorted(self._unconfirmed):
            if node in self._lost_writes:   # said once: what is written again after it is confirmed anew
                self._lost_writes.discard(node)
                self._unconfirmed.discard(node)
                self._unconfirmed_other.discard(node)
                raise NodeLostError(f"the tier server of node {node} was lost before this process's latest changes "
                                    f"to it other than writes (a file's creation, size, open count) were on its "
                                    f"replica (promoted since); they may be gone: check the files and open them "
                                    f"again.", node)
            if node in self.failed_over:
                continue
            with self._on(node, write=False):
                pipe = self.clients[node].pipeline(transaction=False)
                pipe.set(self._confirmed[node], 1)
                pipe.execute_command("WAIT", 1, wait_ms)
                copies = int(pipe.execute()[1])
            if copies < 1:
                raise ReplicaError(f"the replica of node {node} ({self._where(node)}) did not confirm this "
                                   f"process's writes within {wait_ms / 1000:.0f} s; they are on one node only. "
                                   f"Check the replica's server log and 'mpiburst status'.")
        self._unconfirmed.clear()
        self._unconfirmed_other.clear()
        self.pushed, self._pushed_bytes = [], 0

    def _lost(self, node: int, exc: BaseException) -> NodeLostError:
        """Return the error for an unreachable ``node``, naming the files whose data it held when known."""
        if isinstance(exc, NodeLostError):
            return exc
        raw = exc.__cause__ if isinstance(exc, MpiburstError) and exc.__cause__ is not None else exc
        cause = str(raw) or type(raw).__name__
        where = f"the tier server of node {node} ({self._where(node)})"
        if node == 0:
            return NodeLostError(f"lost the connection to {where}, which holds every file's record ({cause}); "
                                 "check that the run is up with 'mpiburst status' and read its server log.", node)
        lost: list[str] | None = None
        if hasattr(self, "home"):   # not while the store is being made
            with suppress(MpiburstError, redis.RedisError, OSError):
                lost = self.files_on(node)
        held = ("; it held no file's data" if lost == [] else
                f"; it held data of {', '.join(lost)}" if lost else "")
        return NodeLostError(f"lost the connection to {where} ({cause}){held}; check that the run is up "
                             "with 'mpiburst status' and read its server log.", node, tuple(lost or ()))

    def files_on(self, node: int) -> list[str]:
        """Return the paths of the files whose record marks data on ``node``, sorted."""
        registry = cast("dict[bytes, bytes]", self.home.r.hgetall(self.home.keys.files))   # bytes: never decoded
        fids = list(registry)
        pipe = self.home.r.pipeline(transaction=False)
        for fid in fids:
            pipe.hexists(self.home.keys.file(fid.decode(), "m"), f"@{node}")
        return sorted(registry[f].decode() for f, on in zip(fids, pipe.execute()) if on)

    def _record(self, path: str) -> tuple[FileMeta | None, list[int]]:
        """Return the file's record and the nodes it marks, in one read of the home."""
        with self._on(0, write=False):
            raw = cast("dict[bytes, bytes]", self.home.r.hgetall(self.home.keys.file(file_id(path), "m")))   # bytes: never decoded
        if not raw:
            return None, []
        return schema.meta_from(raw), sorted(int(k[1:]) for k in raw if k.startswith(b"@"))

    @property
    def placement(self) -> Placement:
        """Where the data lies: the nodes that hold each file's bytes (see :class:`NodePlacement`)."""
        return NodePlacement(self)

    def holders(self, path: str) -> list[int]:
        """Return the nodes whose servers hold data of ``path`` (the marks of its record), in node order."""
        return self._record(path)[1]

    def node_index(self, path: str, node: int, page: int = 4096) -> Iterator[Entry]:
        """Yield the index entries of ``path`` that ``node``'s server holds, each once, asking that server only.

        Plain extents come in offset order, a page of ``page`` at a time, then
        the strided runs. Blob ids are that node's own (not cluster-wide):
        enough to see where the file's bytes lie, as the flush's planning of
        which rank writes which stripes does (:mod:`mpiburst.flush`).
        """
        shard = self.shards[node]
        fid = file_id(path)
        start = 0
        while True:
            with self._on(node, write=False):
                found = list(schema.parse_extents(shard.r.execute_command(
                    "ZRANGE", shard.keys.file(fid, "x"), start, start + page - 1, "WITHSCORES")))
            yield from found
            if len(found) < page:
                break
            start += page
        with self._on(node, write=False):
            raw = shard.r.execute_command("ZRANGE", shard.keys.file(fid, "v"), 0, -1, "WITHSCORES")
        yield from schema.parse_strided(raw)

    def _global(self, node: int, blob: int) -> int:
        return blob * len(self.clients) + node

    def _extents_of(self, node: int, found: Iterable[Any]) -> list[Any]:
        """Return a shard's extents with cluster-wide blob ids."""
        n = len(self.clients)
        return [e._replace(blob=e.blob * n + node) for e in found]

    def _fence_nodes(self, path: str, nodes: Iterable[int], value: int) -> None:
        """Raise the fence of ``path`` on ``nodes`` to ``value`` (see the module docstring)."""
        fid = file_id(path)
        for node in nodes:
            with self._on(node, redone=True):
                self._fence[node](keys=[self.shards[node].keys.file(fid, "m")], args=[value, path])

    # -- file records -------------------------------------------------------
    def meta(self, path: str) -> FileMeta | None:
        with self._on(0, write=False):
            return self.home.meta(path)

    def create(self, path: str, bfs_size: int | None, umask: int | None = None,
               writing: bool = False, looked: bool = True) -> FileMeta:
        with self._on(0):   # the record and its writer count live on node 0
            return self.home.create(path, bfs_size, umask, writing, looked)

    def found_on_bfs(self, path: str, bfs_size: int | None) -> FileMeta | None:
        with self._on(0):
            return self.home.found_on_bfs(path, bfs_size)

    def files(self) -> dict[str, str]:
        with self._on(0, write=False):
            return self.home.files()

    def cut(self) -> dict[str, FileMeta]:
        """Return every file's record in one atomic read of the home (see the module docstring for why it is a cut)."""
        with self._on(0, write=False):
            return self.home.cut()

    def drop(self, path: str) -> None:
        _, nodes = self._record(path)
        with self._on(0):
            self.home.drop(path)
        for node in nodes:
            with self._on(node):
                self.shards[node].drop(path)

    def set_pinned(self, path: str, pinned: bool) -> None:
        with self._on(0):
            self.home.set_pinned(path, pinned)

    def writers(self, path: str, delta: int, settle_at_most: int = -1) -> int:
        with self._on(0):   # the record, its seq and size live on node 0
            return self.home.writers(path, delta, settle_at_most)

    def set_size(self, path: str, size: int) -> int:
        with self._on(0):
            old = self.home.set_size(path, size)
        meta, nodes = self._record(path)
        fid = file_id(path)
        for node in nodes:
            shard = self.shards[node]
            with self._on(node):
                pipe = shard.r.pipeline(transaction=True)   # fence and clip at one instant
                self._fence[node](keys=[shard.keys.file(fid, "m")], args=[meta.seq if meta else 0, path],
                                  client=pipe)
                shard.clip(path, size, pipe)
                pipe.execute()
        return old

    # -- data ---------------------------------------------------------------
    def commit(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
               staged: bool = False) -> int:
        node = self._writer_node()
        shard = self.shards[node]
        tmp = shard.keys.temporary(path)
        data = bytes(payload)   # redis-py with hiredis takes no memoryview; kept as is in :attr:`pushed`
        with self._on(node, redone=True):   # a refusal is translated there; MOVED: the node's replica took over
            shard.r.execute_command("SET", tmp, data)
        return self._numbered(path, node, tmp, channel, data, extents, staged)

    def _numbered(self, path: str, node: int, tmp: str, channel: int, payload: Payload,
                  extents: Sequence[Sequence[int]], staged: bool) -> int:
        """:meth:`_number_and_index`, again if another node's replica took over meanwhile (the payload stays).

        If ``node`` itself, which holds the payload, was lost, :class:`FailedOver` goes up: store the batch again.
        """
        for _ in range(len(self.clients)):
            try:
                base = self._number_and_index(path, node, tmp, channel, payload, extents, staged)
                break
            except FailedOver as exc:
                if exc.node == node:
                    raise
        else:
            base = self._number_and_index(path, node, tmp, channel, payload, extents, staged)
        if not staged and any(self.replicas):   # a staged batch is a copy of the BFS: nothing to send again
            self._keep(Pushed(path, channel, payload if isinstance(payload, bytes) else bytes(payload),
                              list(extents), node, base))
        return base

    def _number_and_index(self, path: str, node: int, tmp: str, channel: int, payload: Payload,
                          extents: Sequence[Sequence[int]], staged: bool) -> int:
        """Take the numbers of a batch whose payload is at ``tmp`` on ``node`` and index it there; return its first.

        Raises RecordGone (and removes the payload) if the file has no record.
        """
        shard = self.shards[node]
        fid = file_id(path)
        end = batch_end(extents)
        base: int | None = None
        for _ in range(RETRIES):
            if base is None:
                base = self._number(path, fid, node, len(extents), end, staged)
                if base < 0:
                    with self._on(node, redone=True):
                        shard.r.unlink(tmp)
                    raise RecordGone(path)
            with self._on(node, redone=True):
                try:
                    shard.index_sent(path, tmp, channel, len(payload), extents, staged, None if staged else base)
                    return base
                except RecordGone:                 # the node's first batch of the file: same numbers
                    self._open_shard(path, node, None if staged else base - 1)
                except StaleNumbers:               # overtaken by a flush or truncation: new numbers
                    base = None
                except MpiburstError as exc:
                    if not isinstance(exc, TierConnectionError):   # a lost node: _on says so
                        shard.r.unlink(tmp)
                    raise
        with self._on(node, redone=True):
            shard.r.unlink(tmp)
        raise ServerError(f"a batch of {path} was overtaken by {RETRIES} flushes or truncations in a row; "
                          "write it again.")

    def _number(self, path: str, fid: str, node: int, count: int, end: int, staged: bool) -> int:
        """Have the home hand out ``count`` sequence numbers for a batch on ``node``; return the first (-1: no record)."""
        with self._on(0, redone=True):
            try:
                return int(self._reserve(keys=[self.home.keys.file(fid, "m"), self._counter],
                                         args=[count, end, f"@{node}", int(staged)]))
            except redis.ResponseError as exc:
                if not str(exc).startswith("NOFILE"):
                    raise
                return -1

    def _open_shard(self, path: str, node: int, fence: int | None) -> None:
        """Create ``node``'s record of ``path`` (unless it exists) with its fence at ``fence``.

        ``fence`` is just below the numbers of the batch that opens it (None:
        the global counter's value): batches numbered earlier are refused
        and numbered anew, so none numbered for a dropped file of the same
        name lands here.
        """
        if fence is None:
            with self._on(0, write=False):
                fence = int(self.clients[0].get(self._counter) or 0)
        shard = self.shards[node]
        mkey = shard.keys.file(file_id(path), "m")
        with self._on(node, redone=True):
            pipe = shard.r.pipeline(transaction=True)
            pipe.hsetnx(mkey, "path", path)
            pipe.hsetnx(mkey, "fence", fence)
            pipe.execute()

    def writer(self) -> BatchWriter:
        return ClusterBatchWriter(self)

    def extents(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Extent]:
        _, nodes = self._record(path)
        return self._gather(nodes, lambda s: s.extents(path, lo, hi, upto))

    def index(self, path: str, lo: int, hi: int, upto: int | None = None) -> list[Entry]:
        _, nodes = self._record(path)
        return self._gather(nodes, lambda s: s.index(path, lo, hi, upto))

    def _gather(self, nodes: Iterable[int], ask: Any) -> list[Any]:
        """Ask each of ``nodes``' shards for extents; return them all in offset order (then sequence)."""
        found: list[Any] = []
        for node in nodes:
            with self._on(node, write=False):
                found += self._extents_of(node, ask(self.shards[node]))
        found.sort(key=lambda e: (e.start, e.seq))
        return found

    def extents_from(self, path: str, start: int, count: int) -> list[Entry]:
        _, nodes = self._record(path)
        pages = []
        for node in nodes:
            with self._on(node, write=False):
                pages.append(self._extents_of(node, self.shards[node].extents_from(path, start, count)))
        found = sorted((e for page in pages for e in page), key=lambda e: (e.start, e.seq))
        full = [page for page in pages if len(page) == count]
        if full:
            # Past the lowest last start of a full page some node's extents may be missing: keep what
            # lies before it, then take every extent starting exactly there from every node.
            bound = min(page[-1].start for page in full)
            found = [e for e in found if e.start < bound]
            if len(found) < count:
                found += self._gather(nodes, lambda s: [e for e in s.extents(path, bound, bound + 1)
                                                        if e.start == bound])
        return found[:count]

    def window(self, path: str, lo: int, hi: int) -> tuple[FileMeta | None, list[Extent]]:
        meta, nodes = self._record(path)
        if meta is None:
            return None, []
        return meta, self._gather(nodes, lambda s: s.extents(path, lo, hi))

    def all_extents(self, path: str) -> Iterator[Extent]:
        _, nodes = self._record(path)
        streams = [self._stream(node, path) for node in nodes]
        yield from heapq.merge(*streams, key=lambda e: (e.start, e.seq))

    def _stream(self, node: int, path: str) -> Iterator[Extent]:
        """Yield a shard's extents of ``path`` in (offset, sequence) order, a run of equal offsets at a time."""
        run: list[Extent] = []
        with self._on(node, write=False):
            for e in self.shards[node].all_extents(path):
                if run and e.start != run[0].start:
                    yield from self._extents_of(node, sorted(run, key=lambda x: x.seq))
                    run = []
                run.append(e)
        yield from self._extents_of(node, sorted(run, key=lambda x: x.seq))

    def fetch_into(self, path: str, extents: Iterable[Entry], lo: int, out: memoryview) -> bool:
        """Paint ``extents`` into ``out`` from the nodes that hold them (see :meth:`Store.fetch_into`).

        Extents of different nodes that overlap are painted in sequence
        order, a run of one node's extents at a time, so the newest wins.
        """
        hi = lo + len(out)
        n = len(self.clients)
        pieces = [e for e in extents if e.start < hi and e.end > lo]
        if not pieces:
            return True
        runs: list[tuple[int, list[Entry]]] = []
        if any(isinstance(e, Strided) for e in pieces) or overlapping(pieces):   # type: ignore[arg-type]
            for e in sorted(pieces, key=lambda e: e.seq):
                if runs and runs[-1][0] == e.blob % n:
                    runs[-1][1].append(e)
                else:
                    runs.append((e.blob % n, [e]))
        else:
            by_node: dict[int, list[Entry]] = {}
            for e in pieces:
                by_node.setdefault(e.blob % n, []).append(e)
            runs = sorted(by_node.items())
        for node, run in runs:
            with self._on(node, write=False):
                if not self.shards[node].fetch_into(path, [e._replace(blob=e.blob // n) for e in run], lo, out):
                    return False
            self.read_bytes[node] += sum(_bytes_in(e, lo, hi) for e in run)
        return True

    def blobs(self, path: str, lo_seq: float = 0, hi_seq: float = float("inf")) -> list[Blob]:
        _, nodes = self._record(path)
        found = []
        for node in nodes:
            with self._on(node, write=False):
                found += [b._replace(blob=self._global(node, b.blob))
                          for b in self.shards[node].blobs(path, lo_seq, hi_seq)]
        return sorted(found, key=lambda b: (b.last, b.blob))

    def drop_clean(self, path: str) -> int:
        meta, nodes = self._record(path)
        if meta is None:
            return 0
        freed = 0
        for node in nodes:
            with self._on(node, redone=True):
                freed += self.shards[node].free_clean(path, meta.clean)
        return freed

    # -- the flush lease ----------------------------------------------------
    def lease(self, path: str, seconds: float) -> str | None:
        with self._on(0, redone=True):
            return self.home.lease(path, seconds)

    def renew(self, path: str, token: str, seconds: float) -> bool:
        with self._on(0, redone=True):
            return self.home.renew(path, token, seconds)

    def begin(self, path: str) -> FileMeta:
        """Record the snapshot on the home, then fence every node of the file at it (before any index is read)."""
        with self._on(0, redone=True):
            meta = self.home.begin(path)
        _, nodes = self._record(path)
        self._fence_nodes(path, nodes, meta.pending)
        return meta

    def mark_clean(self, path: str, token: str, upto: int, trunc: int | None) -> bool:
        _, nodes = self._record(path)
        self._fence_nodes(path, nodes, upto)     # raising a fence is always safe: a late batch is numbered anew
        with self._on(0, redone=True):
            return self.home.mark_clean(path, token, upto, trunc)

    def release(self, path: str, token: str) -> None:
        with self._on(0, redone=True):
            self.home.release(path, token)

    def leased(self, path: str) -> bool:
        with self._on(0, write=False):
            return self.home.leased(path)

    # -- channels -----------------------------------------------------------
    def _channel_node(self, channel: int) -> int:
        """Return the node channel ``channel`` lives on (its rank's node)."""
        if self.ranks:
            for node, (lo, hi) in enumerate(self.ranks):
                if lo <= channel < hi:
                    return node
        return channel % len(self.clients)

    def channel_open(self, channel: int) -> str | None:
        node = self._channel_node(channel)
        with self._on(node):
            return self.shards[node].channel_open(channel)

    def channel_append(self, channel: int, pieces: Sequence[bytes], stored: bool = False) -> None:
        node = self._channel_node(channel)
        with self._on(node):
            self.shards[node].channel_append(channel, pieces, stored)

    def channel_close(self, channel: int, token: str) -> None:
        node = self._channel_node(channel)
        with self._on(node):
            self.shards[node].channel_close(channel, token)

    def _per_node(self, channels: Sequence[int], ask: Any, write: bool = True) -> list:
        """Ask each node about its own ``channels``; return the answers in the order of ``channels``."""
        by_node: dict[int, list[int]] = {}
        for i, c in enumerate(channels):
            by_node.setdefault(self._channel_node(c), []).append(i)
        out: list = [None] * len(channels)
        for node, where in by_node.items():
            with self._on(node, write=write):
                for i, answer in zip(where, ask(self.shards[node], [channels[i] for i in where])):
                    out[i] = answer
        return out

    def channel_states(self, channels: Sequence[int]) -> list[ChannelState]:
        return self._per_node(channels, lambda shard, mine: shard.channel_states(mine), write=False)

    def channel_read(self, channel: int, start: int, count: int) -> list[bytes]:
        node = self._channel_node(channel)
        with self._on(node, write=False):
            return self.shards[node].channel_read(channel, start, count)

    def channel_reset(self, channels: Sequence[int]) -> list[bool]:
        return self._per_node(channels, lambda shard, mine: shard.channel_reset(mine))

    # -- request queue, shared file pointers, statistics: on the home ---------
    def enqueue(self, request: bytes) -> None:
        with self._on(0):
            self.home.enqueue(request)

    def dequeue(self, timeout: float = 0.0) -> bytes | None:
        with self._on(0):
            return self.home.dequeue(timeout)

    def queued(self) -> int:
        with self._on(0, write=False):
            return self.home.queued()

    def shared_pointer(self, path: str, token: str, delta: int = 0) -> int:
        with self._on(0):
            return self.home.shared_pointer(path, token, delta)

    def set_shared_pointer(self, path: str, token: str, value: int) -> None:
        with self._on(0):
            self.home.set_shared_pointer(path, token, value)

    def drop_shared_pointer(self, path: str, token: str) -> None:
        with self._on(0):
            self.home.drop_shared_pointer(path, token)

    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        node = self._writer_node()   # on this process's node, as its batches: they outlive a lost node 0
        with self._on(node, redone=True):
            self.shards[node].stats_add(path, who, counters)

    def stats_log(self, event: Mapping[str, Any]) -> None:
        with self._on(0, redone=True):
            self.home.stats_log(event)

    def stats_log_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        with self._on(0, redone=True):
            self.home.stats_log_many(events)

    def stats(self) -> tuple[dict[str, dict[str, dict[str, int]]], list[dict[str, Any]]]:
        return self.stats_of(range(self.nodes))

    def stats_of(self, nodes: Iterable[int]) -> tuple[dict[str, dict[str, dict[str, int]]], list[dict[str, Any]]]:
        """Return the statistics ``nodes`` hold, as :meth:`stats` does: their processes' counters, summed.

        Each node holds the counters of the processes on it; node 0 also
        holds the event log (empty here without node 0).
        """
        counters: dict[str, dict[str, dict[str, int]]] = {}
        log: list[dict[str, Any]] = []
        for node in nodes:
            with self._on(node, write=False):
                held = self.shards[node].stats()[0]
                if node == 0:
                    log = self.home.stats()[1]
            for path, by_process in held.items():
                for who, named in by_process.items():
                    mine = counters.setdefault(path, {}).setdefault(who, {})
                    for name, value in named.items():
                        mine[name] = mine.get(name, 0) + value
        return counters, log

    # -- the whole store ----------------------------------------------------
    def node_memory(self) -> list[tuple[int, int]]:
        """Return ``(bytes used, limit)`` of each node's server, in node order."""
        out = []
        for node, shard in enumerate(self.shards):
            with self._on(node, write=False):
                out.append(shard.memory())
        return out

    def memory(self) -> tuple[int, int]:
        """Return the cluster's ``(bytes used, limit)``: the sums over the nodes (0 if any node has no limit)."""
        each = self.node_memory()
        limit = 0 if any(lim == 0 for _, lim in each) else sum(lim for _, lim in each)
        return sum(used for used, _ in each), limit

    def traffic(self) -> tuple[int, int] | None:
        got, sent = 0, 0
        for node, shard in enumerate(self.shards):
            with self._on(node, write=False):
                one = shard.traffic()
            got, sent = got + one[0], sent + one[1]
        return got, sent

    def empty(self) -> bool:
        keys = other = 0
        for node, client in enumerate(self.clients):
            with self._on(node, write=False):   # neither statistics nor the counter are data
                keys += int(client.dbsize())
                other += int(client.exists(self.shards[node].keys.stats, self._confirmed[node]))
        with self._on(0, write=False):
            other += int(self.clients[0].exists(self.home.keys.stats_log, self._counter))
        return keys == other

    def close(self) -> None:
        for client in self.clients + [r for r in self.replicas if r is not None]:
            client.close()


class ClusterBatchWriter(BatchWriter):
    """Pipelined commits to this process's node: the payload streams while the caller fills the next batch.

    :meth:`send` writes the payload under a temporary key on a connection of
    its own; :meth:`finish` reads that reply, then has the batch numbered by
    the home and indexed on the node (two small round trips).
    """

    def __init__(self, store: ClusterStore) -> None:
        self.store = store
        self.node = store._writer_node()
        self._pool: Any = None
        self._conn: Any = None
        self._sent: tuple[str, int, Payload, list[Sequence[int]], str | None] | None = None
        self._closing = False

    def _borrow(self) -> Any:
        """Return this writer's connection to its node's server (anew after the node's replica took over)."""
        pool = self.store.clients[self.node].connection_pool
        if self._conn is not None and self._pool is not pool:
            self._conn = None   # the lost server's: its client is closed
        if self._conn is None:
            with self.store._on(self.node, write=False):
                self._conn, self._pool = borrow(pool), pool
        return self._conn

    def send(self, path: str, channel: int, payload: Payload, extents: Sequence[Sequence[int]],
             closing: bool = False, new: NewFile | None = None) -> None:
        self._closing = closing   # the count lives on the home: counted there once the batch is stored (finish)
        self.made = False
        if new is not None:   # on the home, before the payload leaves (a round trip of its own)
            self.store.create(path, None, new.umask, writing=True, looked=False)
            self.made = True
        tmp: str | None = self.store.shards[self.node].keys.temporary(path)
        try:
            conn = self._borrow()
            with self.store._on(self.node, redone=True):
                try:
                    conn.send_packed_command(resp_frames([("SET", tmp, payload)]), check_health=False)
                except BaseException:
                    conn.disconnect()
                    raise
        except FailedOver:
            tmp = None   # finish() stores the batch on the promoted replica
        self._sent = (path, channel, payload, list(extents), tmp)

    def finish(self) -> int:
        sent, self._sent = self._sent, None
        if sent is None:
            raise RuntimeError("finish() without a batch in flight")
        path, channel, payload, extents, tmp = sent
        base = self._store_sent(path, channel, payload, extents, tmp)
        if self._closing:
            self.store.writers(path, -1)
        return base

    def stats_add(self, path: str, who: str, counters: Mapping[str, int]) -> None:
        self.store.stats_add(path, who, counters)   # on this process's node, as the batches

    def _store_sent(self, path: str, channel: int, payload: Payload, extents: list[Sequence[int]],
                    tmp: str | None) -> int:
        """Read the payload's reply, then have the batch numbered and indexed; return its first sequence number."""
        if tmp is not None:
            try:
                with self.store._on(self.node, redone=True):
                    try:
                        self._conn.read_response()
                    except redis.ResponseError:
                        raise   # a whole reply: the connection stays usable (_on translates it, or fails over)
                    except BaseException:
                        self._conn.disconnect()   # a half-read reply stream must not be reused
                        raise
                return self.store._numbered(path, self.node, tmp, channel, payload, extents, False)
            except FailedOver:
                pass   # this node's server was lost with the payload
        return self.store.commit(path, channel, payload, extents)   # again, on the node's promoted replica

    def close(self) -> None:
        if self._conn is not None:
            self._pool.release(self._conn)
            self._conn = None


class NodePlacement(Placement):
    """:attr:`ClusterStore.placement`: each file's bytes lie on the nodes that wrote them (its record's marks)."""

    def __init__(self, store: ClusterStore) -> None:
        self.store = store

    @property
    def nodes(self) -> int:
        return self.store.nodes

    @property
    def local(self) -> int | None:
        return self.store.local

    def holders(self, path: str) -> list[int]:
        return self.store.holders(path)

    def node_index(self, path: str, node: int) -> Iterator[Entry]:
        return self.store.node_index(path, node)
