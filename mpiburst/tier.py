"""class Tier: a run's fast tier as seen by one process (start, connect, stop, status).

Everything above this layer talks to the tier's data only through
``tier.store`` (a :class:`~mpiburst.store.Store`); ``tier.admin()`` gives the
admin connection for lifecycle commands, and the run's settings are
properties.

``Tier.start`` is collective over an mpi4py communicator: rank 0 starts the
server and every rank gets the run conf or the error rank 0 met
(:func:`mpiburst.collective.on_root`), then connects. On a communicator
spanning several nodes (:mod:`mpiburst.nodes`) each node's first rank starts
its node's cluster-mode server, rank 0 joins them into one cluster, and every
rank's store is a :class:`~mpiburst.store.cluster_store.ClusterStore` writing
to its own node's server. ``Tier.memory`` is an
in-process tier over a :class:`~mpiburst.store.MemoryStore`, for unit tests
only; it is never a stand-in for a real server in an integration test.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from . import engine_process, nodes, server
from .collective import on_root, together
from .errors import AuthenticationError, ConfigError, MpiburstError, ServerError
from .runconf import RunConf, conf_path, find_conf_path, named_dir, resolve_id
from .server import StartOptions, site
from .store import MemoryStore, Store

if TYPE_CHECKING:   # mpi4py is imported only by those who pass a communicator
    from mpi4py import MPI

#: The environment variable naming a job's tier by URL (``mpiburst://NAME``; see :meth:`Tier.attach`).
TIER_ENV = "MPIBURST_TIER"
#: The environment variable giving the seconds a job waits for a named tier that does not exist yet.
TIER_WAIT_ENV = "MPIBURST_TIER_WAIT"
#: Default seconds a job waits for its named tier to be created (DataWarp holds it until then; bounded here).
TIER_WAIT = 300.0


class Tier:
    """A connection to one run's tier (and, on the process that started it, its owner).

    Use :meth:`start`, :meth:`connect`, :meth:`current` or :meth:`memory` to
    get one; the constructor is internal.
    """

    _current: Tier | None = None

    def __init__(self, conf: RunConf, store: Store, client: redis.Redis | None = None, owner: bool = False,
                 comm: MPI.Comm | None = None) -> None:
        self.conf = conf
        self.id = conf.id
        #: The run's data, through the store interface (the only way the layers above reach it).
        self.store = store
        #: The raw connection to a real server as the ordinary user (None for a memory tier); for
        #: tests of the server's own behaviour, never for data.
        self.redis = client
        self._owner = owner
        self._comm = comm
        self._admin: redis.Redis | None = None
        self._stopped = False
        #: The records of new files this process opened and has not sent yet, path -> the functions that send
        #: them (:meth:`send_unsent`).
        self.unsent: dict[str, list[Callable[[], None]]] = {}
        Tier._current = self

    def send_unsent(self, path: str | None = None) -> None:
        """Send the records of new files this process opened and has not sent yet: ``path``'s, or all.

        A new file one process opens with ``MODE_CREATE`` is in the tier from
        its first batch, or its Close (docs/api.md, "New files"). Whatever in
        this process asks the tier about a path by name calls this first, so
        the process sees its own files from their Open, as before.
        """
        if not self.unsent:
            return
        for key in [path] if path is not None else list(self.unsent):
            for send in list(self.unsent.get(key, ())):
                send()

    # ------------------------------------------------------------------ construction

    @classmethod
    def start(cls, comm: MPI.Comm | None = None, options: StartOptions | None = None, **changes: Any) -> Tier:
        """Start a run's server and connect every rank of ``comm`` to it (collective).

        Parameters
        ----------
        comm
            An ``mpi4py.MPI.Comm``; rank 0 starts the server and broadcasts the
            conf. ``None`` means a single process (mpi4py is not imported).
        options, **changes
            The start options (:class:`mpiburst.server.StartOptions`, or their
            names as keywords: ``id``, ``dir``, ``channels``, ``bfs_root``,
            ``capacity``, ...). They are checked on every rank before rank 0
            acts, so a misspelled name fails on every rank. ``channels``
            defaults to the size of ``comm`` (1 without one).

        The server is tied to the starting process: if that process dies (an
        aborted MPI job), the server gets SIGTERM and no server is left behind.

        When ``comm`` spans several nodes (see :mod:`mpiburst.nodes`; or
        ``$MPIBURST_RANKS_PER_NODE``), each node's first rank starts its
        node's server in cluster mode (tied to that rank), rank 0 joins them
        into one cluster, writes the conf (with ``nodes``) and starts the
        engine; every rank then writes to its own node's server.

        Raises
        ------
        MpiburstError
            On every rank, if an option is wrong, rank 0 could not start the
            server or a rank could not connect to it.
        """
        opts = StartOptions.of(options, **changes)
        if opts.channels is None and not opts.restart:
            opts = opts.replace(channels=comm.Get_size() if comm is not None else 1)
        if comm is None:
            return cls._attach(_start_run(opts), owner=True)
        node, ranges = together(comm, lambda: nodes.layout(comm)) if comm.Get_size() > 1 else (0, [(0, 1)])
        if len(ranges) == 1:
            conf = on_root(comm, lambda: _start_run(opts))
        else:
            conf = start_nodes(comm, opts, node, ranges, leader=comm.Get_rank() == ranges[node][0])
        tier = together(comm, lambda: cls._attach(conf, owner=comm.Get_rank() == 0, comm=comm,
                                                   node=node if conf.nodes else None))
        comm.Barrier()
        return tier

    @classmethod
    def _attach(cls, conf: RunConf, owner: bool = False, comm: MPI.Comm | None = None,
                node: int | None = None) -> Tier:
        """Connect to the run's server(s) as the ordinary user (``node``: this process's node of a multi-node run)."""
        return cls(conf, *open_store(conf, node), owner=owner, comm=comm)

    @classmethod
    def connect(cls, id: str | None = None, conf: RunConf | str | None = None, dir: str | None = None) -> Tier:
        """Join an existing run (a process that did not start it), or a tier named by a URL.

        On a multi-node run the process writes to the server of its node
        (:func:`mpiburst.nodes.node_of_process`: the node on this host, or
        the one whose ranks hold this process's MPI rank), else to node 0's.

        Parameters
        ----------
        id
            The run ID; with ``dir`` (default: cwd) it locates ``mpiburst_<id>.conf``.
            Or a URL (see :meth:`attach`): ``mpiburst://NAME`` (a named tier,
            ``mpiburst create NAME``), ``memory://NAME`` (this process's
            memory tier NAME, for tests), ``valkey://`` / ``redis://HOST:PORT``
            (a server the site runs).
        conf
            A :class:`RunConf` or the path of a conf file; wins over ``id``.
            Without either, ``$MPIBURST_TIER`` (a URL), else ``$MPIBURST_CONF``,
            else the ID rules in the cwd.

        Raises
        ------
        ConfigError
            If the conf file is missing or unsafe.
        AuthenticationError, ServerError
            If the server refuses the password or cannot be reached.
        """
        if conf is None and dir is None and (id or os.environ.get(TIER_ENV, "")).partition("://")[1]:
            return cls.attach(id or os.environ[TIER_ENV])
        if not isinstance(conf, RunConf):
            path = conf or (conf_path(os.path.abspath(dir or os.getcwd()), id) if id else find_conf_path(None, dir))
            conf = RunConf.load(path)
        if conf.pid is None:
            raise ConfigError(f"run {conf.id} is not running; start it with 'mpiburst start --restart --id {conf.id}'.")
        return cls._attach(conf, node=nodes.node_of_process(conf.nodes) if conf.nodes else None)

    @classmethod
    def attach(cls, url: str, wait: float | None = None) -> Tier:
        """Connect to the tier a URL names.

        Parameters
        ----------
        url
            ``mpiburst://NAME``: the named tier NAME of this user (its conf in
            ``~/.mpiburst/tiers/NAME/``, see :func:`mpiburst.runconf.tiers_dir`).
            One that does not exist yet is waited for, as DataWarp holds a
            job until its persistent buffer exists (see ``wait``).
            ``memory://NAME``: a memory tier shared by everything in this
            process that attaches to the same NAME (unit tests only; its BFS
            root is the current directory when it is first made).
            ``valkey://HOST:PORT``, ``redis://HOST:PORT`` or, over TLS,
            ``rediss://HOST:PORT`` (query options ``credentials=FILE``,
            ``bfs_root=DIR``, ``channels=N``, ``ca=FILE``, ``cert=FILE``,
            ``key=FILE``, ``cluster=1``): a server the site runs, or any node
            of a cluster it runs, checked for what mpiburst needs of it (see
            :mod:`mpiburst.server.site`).
        wait
            Seconds to wait for a named tier that does not exist yet to be
            created (default ``$MPIBURST_TIER_WAIT``, else
            :data:`TIER_WAIT`; 0: fail at once).

        Raises
        ------
        ConfigError
            For an unknown scheme, a named tier that does not exist (after ``wait``), a site
            server that lacks what mpiburst needs, or plaintext to another host.
        ServerError
            If a site's server cannot be reached (over TLS: its certificate
            is not the CA's or does not name the URL's host).
        """
        scheme, _, rest = url.partition("://")
        if scheme == "mpiburst":
            name = rest.strip("/")
            try:
                return cls.connect(conf=wait_for_named(name, wait))
            except AuthenticationError:
                raise
            except ServerError as exc:   # the run's advice ('mpiburst status --id') does not find a named tier
                raise ServerError(f"named tier {name} cannot be reached ({exc.__cause__ or 'no server'}); 'mpiburst "
                                  f"list' shows whether its server is up; if it is down its data is lost: 'mpiburst "
                                  f"destroy {name} --discard', then create it again.") from exc.__cause__
        if scheme == "memory":
            name = rest.strip("/") or "default"
            if name not in _memory_tiers:
                _memory_tiers[name] = cls.memory(os.getcwd())
            made = _memory_tiers[name]
            return cls(made.conf, made.store)
        if scheme in site.SCHEMES:
            return cls(*site.open_site(url))
        raise ConfigError(f"tier URL {url!r} has an unknown scheme; use mpiburst://NAME, memory://NAME, "
                          f"valkey://HOST:PORT, redis://HOST:PORT or rediss://HOST:PORT.")

    @classmethod
    def current(cls, comm: MPI.Comm | None = None) -> Tier:
        """Return the Tier this process started or connected last, else connect from the environment.

        Parameters
        ----------
        comm
            The communicator of a collective call that may reach the tier for
            the first time here (``File.Open``, a collective ``sync``): the
            ranks then agree, so a connect that fails on one rank (a stalled
            or dead server) raises on every rank instead of leaving the
            others waiting in the collective it left.
        """
        def find() -> Tier:
            if cls._current is not None and not cls._current._stopped:
                return cls._current
            return cls.connect()

        return together(comm, find) if comm is not None else find()

    @classmethod
    def memory(cls, bfs_root: str, channels: int = 1, capacity: int | None = None, align: int = 1 << 20) -> Tier:
        """Return an in-process tier over a :class:`~mpiburst.store.MemoryStore` (unit tests only: no server, no MPI).

        ``capacity`` bounds its data, as ``maxmemory`` bounds a server's.
        """
        conf = RunConf(
            id="memory", dir=os.path.abspath(bfs_root), host="memory", port=0, socket="", user="memory",
            password="memory", channels=channels,
            bfs_root=os.path.abspath(bfs_root), capacity=capacity or (1 << 30), align=align, pid=None,
            server="memory",
        )
        return cls(conf, MemoryStore(capacity))

    # ------------------------------------------------------------------ use

    @property
    def bfs_root(self) -> str:
        """The backing-filesystem directory this run's files belong under."""
        return self.conf.bfs_root

    @property
    def channels(self) -> int:
        """The number of channels of this run."""
        return self.conf.channels

    @property
    def align(self) -> int:
        """The flush alignment in bytes."""
        return self.conf.align

    @property
    def capacity(self) -> int:
        """The server's memory limit in bytes."""
        return self.conf.capacity

    @property
    def is_memory(self) -> bool:
        """True for an in-process tier made by :meth:`memory`."""
        return self.redis is None

    def admin(self) -> redis.Redis:
        """Return a connection as the admin user (INFO, SAVE, SHUTDOWN); opened on first use.

        Raises
        ------
        ConfigError
            For a memory tier, which has no server.
        """
        if self.is_memory:
            raise ConfigError("a memory tier has no server to administer; start a real run with Tier.start.")
        if self._admin is None:
            self._admin = server.connect_redis(self.conf, admin=True)
        return self._admin

    def status(self) -> dict:
        """Return the run's state (see :func:`mpiburst.server.status`)."""
        if self.is_memory:
            return dict(id=self.id, up=not self._stopped, pid=None, channels=self.channels, capacity=self.capacity,
                        used_memory=None, clients=None, engine="memory",
                        bfs_root=self.bfs_root, align=self.align)
        return server.status(self.conf)

    def disconnect(self) -> None:
        """Close this process's connections (the server keeps running)."""
        self.store.close()
        for client in (self.redis, self._admin):
            if client is not None:
                client.close()
        self._admin = None
        self._stopped = True
        if Tier._current is self:
            Tier._current = None

    def stop(self, save: bool = False) -> None:
        """Stop the run's server (``save``: write ``redis_<id>.rdb`` for a later restart) and disconnect.

        Any process holding the run's conf may stop it; ranks that only
        leave should call :meth:`disconnect`.
        """
        if self._stopped:
            return
        self.disconnect()
        if not self.is_memory:
            server.stop_run(self.conf, save=save)

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Stop the server on the starting process (after a barrier when the block succeeded); disconnect elsewhere."""
        if self._comm is not None and exc_type is None:
            self._comm.Barrier()
        if self._owner:
            self.stop()
        else:
            self.disconnect()

    def __repr__(self) -> str:
        return f"<Tier {self.id} {self.conf.host}:{self.conf.port} channels={self.channels}>"


def wait_for_named(name: str, wait: float | None = None) -> str:
    """Return the conf path of named tier ``name`` once it exists, waiting up to ``wait`` seconds for its creation.

    ``wait`` None: ``$MPIBURST_TIER_WAIT``, else :data:`TIER_WAIT`. While it
    waits, the process of MPI rank 0 (or one outside MPI) says so on stderr,
    once.

    Raises
    ------
    ConfigError
        If the tier still does not exist when the wait is over, or ``$MPIBURST_TIER_WAIT`` is not a number.
    """
    if wait is None:
        text = os.environ.get(TIER_WAIT_ENV, "").strip()
        try:
            wait = float(text) if text else TIER_WAIT
        except ValueError:
            raise ConfigError(f"{TIER_WAIT_ENV}={text!r} is not a number of seconds; set it to how long a job waits "
                              f"for a named tier to be created (0: not at all).") from None
    path = conf_path(named_dir(name), name)
    deadline = time.monotonic() + max(0.0, wait)
    told = False
    while not _started(path):
        if time.monotonic() >= deadline:
            raise ConfigError(f"there is no named tier {name!r} ({path} is missing{f' after {wait:g} s' if wait > 0 else ''}); "
                              f"create it with 'mpiburst create {name} --capacity SIZE --ttl TIME'.")
        if not told and nodes.world_rank() in (None, 0):
            print(f"mpiburst: named tier {name} does not exist yet; waiting up to {wait:g} s for 'mpiburst create "
                  f"{name}' ({TIER_WAIT_ENV})", file=sys.stderr, flush=True)
        told = True
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        path = conf_path(named_dir(name), name)   # the tiers' directory may be made meanwhile: checked again
    return path


def _started(path: str) -> bool:
    """True once the conf at ``path`` exists and names its server: ``mpiburst create`` saves it first without one."""
    if not os.path.lexists(path):
        return False
    try:
        conf = RunConf.load(path)
    except MpiburstError:
        return True            # unreadable: attaching says what is wrong with it
    return conf.pid is not None or bool(conf.nodes)


#: The memory tiers of this process made by ``memory://NAME``, by name.
_memory_tiers: dict[str, Tier] = {}


def open_store(conf: RunConf, node: int | None = None) -> tuple[Store, redis.Redis]:
    """Return the store of a run and the raw client of this process's server (node 0's on no node).

    A multi-node run's store is a :class:`ClusterStore` over one client per
    node; ``node`` is this process's node (its writes go there), None for a
    process on no node (the CLI, the engine).

    Raises
    ------
    AuthenticationError, ServerError
        If a server refuses the password or cannot be reached.
    """
    store, clients = server.connect_store(conf, node)
    return store, clients[node or 0]


def _start_run(options: StartOptions) -> RunConf:
    """Start a run's server, tied to this process, and the automatic engine beside it."""
    return engine_process.attach(server.start_run(options, tied=True))


def start_nodes(comm: MPI.Comm, opts: StartOptions, node: int, ranges: list[tuple[int, int]], leader: bool,
                take_lock: bool = True) -> RunConf:
    """Start a multi-node run (collective): one server per node, formed into one cluster; return its conf.

    Parameters
    ----------
    node
        This rank's node index.
    ranges
        Every node's half-open range of the run's ranks (channels), in node order.
    leader
        This rank starts its node's server (exactly one rank per node).
    take_lock
        Rank 0 takes the run's start lock (False: the process that launched
        this job holds it, as ``mpiburst run`` does).

    Rank 0 holds the run's start lock throughout, writes the run-wide files
    and starts the engine; each leader starts its node's server, tied to
    itself. If anything fails anywhere, every rank raises and every started
    server is stopped (by the rank that started it).
    """
    rank = comm.Get_rank()
    hosts = comm.allgather(socket.gethostname())
    nodes_here = len(set(hosts)) == 1
    bind = opts.bind or ("127.0.0.1" if nodes_here else None)
    # each node's leader finds the address its node listens on, so the run's certificate names every node
    address = together(comm, lambda: server.node_address(bind, node, len(ranges)) if leader else None)
    addresses = [a for a in comm.allgather(address) if a]
    lock: server.RunLock | None = None

    def plan() -> server.ClusterPlan:
        nonlocal lock
        if take_lock:
            held = server.RunLock(server.run_directory(opts.dir), resolve_id(opts.id), "Tier.start")
            lock = held.__enter__()
        return server.plan_cluster(opts, nodes_here=nodes_here, count=len(ranges), addresses=addresses)

    entry: dict | None = None
    started: server.ClusterPlan | None = None

    def launch() -> dict | None:
        nonlocal entry
        if leader:  # kept before the ranks agree, so a failure elsewhere still stops this node's server
            entry = server.launch_planned_node(planned, node, len(ranges), ranges[node], tied=True)
        return entry

    try:
        started = on_root(comm, plan)
        planned = started
        entries = comm.gather(together(comm, launch))

        def form() -> RunConf:
            assert entries is not None   # run on the root, where gather returns the list
            return engine_process.attach(server.form_planned(planned, [e for e in entries if e]))
        return on_root(comm, form)
    except BaseException:
        if entry is not None and started is not None:
            server.kill(entry["pid"], started.conf.server)
            server.clean_node(started.conf, node, entry["socket"], keep_snapshot=True)
        if rank == 0 and started is not None:
            server.abandon_cluster(started.conf, keep_conf=bool(opts.restart))
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
