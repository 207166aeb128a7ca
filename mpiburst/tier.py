"""class Tier: a run's fast tier as seen by one process (start, connect, stop, status).

Everything above this layer talks to the tier's data only through
``tier.store`` (a :class:`~mpiburst.store.Store`); ``tier.admin()`` gives the
admin connection for lifecycle commands, and the run's settings are
properties.

``Tier.start`` is collective over an mpi4py communicator: rank 0 starts the
server and every rank gets the run conf or the error rank 0 met
(:func:`mpiburst.collective.on_root`), then connects. ``Tier.memory`` is an
in-process tier over a :class:`~mpiburst.store.MemoryStore`, for unit tests
only; it is never a stand-in for a real server in an integration test.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from . import engine_process, server
from .collective import on_root, together
from .errors import ConfigError
from .runconf import RunConf, conf_path, find_conf_path
from .server import StartOptions
from .store import MemoryStore, RedisStore, Store


class Tier:
    """A connection to one run's tier (and, on the process that started it, its owner).

    Use :meth:`start`, :meth:`connect`, :meth:`current` or :meth:`memory` to
    get one; the constructor is internal.
    """

    _current: "Tier | None" = None

    def __init__(self, conf: RunConf, store: Store, client: redis.Redis | None = None, owner: bool = False,
                 comm: Any = None) -> None:
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
        Tier._current = self

    # ------------------------------------------------------------------ construction

    @classmethod
    def start(cls, comm: Any = None, options: StartOptions | None = None, **changes: Any) -> "Tier":
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

        Raises
        ------
        MpiburstError
            On every rank, if an option is wrong, rank 0 could not start the
            server or a rank could not connect to it.
        """
        opts = StartOptions.of(options, **changes)
        if opts.channels is None and not opts.restart:
            opts = opts.replace(channels=comm.Get_size() if comm is not None else 1)
        conf = on_root(comm, lambda: _start_run(opts))
        if comm is None:
            return cls._attach(conf, owner=True)
        tier = together(comm, lambda: cls._attach(conf, owner=comm.Get_rank() == 0, comm=comm))
        comm.Barrier()
        return tier

    @classmethod
    def _attach(cls, conf: RunConf, owner: bool = False, comm: Any = None) -> "Tier":
        """Connect to the server described by ``conf`` as the ordinary user."""
        client = server.connect_redis(conf)
        return cls(conf, RedisStore(client), client, owner=owner, comm=comm)

    @classmethod
    def connect(cls, id: str | None = None, conf: RunConf | str | None = None, dir: str | None = None) -> "Tier":
        """Join an existing run (a process that did not start it).

        Parameters
        ----------
        id
            The run ID; with ``dir`` (default: cwd) it locates ``mpiburst_<id>.conf``.
        conf
            A :class:`RunConf` or the path of a conf file; wins over ``id``.
            Without either, ``$MPIBURST_CONF``, else the ID rules in the cwd.

        Raises
        ------
        ConfigError
            If the conf file is missing or unsafe.
        AuthenticationError, ServerError
            If the server refuses the password or cannot be reached.
        """
        if not isinstance(conf, RunConf):
            path = conf or (conf_path(os.path.abspath(dir or os.getcwd()), id) if id else find_conf_path(None, dir))
            conf = RunConf.load(path)
        if conf.pid is None:
            raise ConfigError(f"run {conf.id} is not running; start it with 'mpiburst start --restart --id {conf.id}'.")
        return cls._attach(conf)

    @classmethod
    def current(cls) -> "Tier":
        """Return the Tier this process started or connected last, else connect from the environment."""
        if cls._current is not None and not cls._current._stopped:
            return cls._current
        return cls.connect()

    @classmethod
    def memory(cls, bfs_root: str, channels: int = 1, capacity: int | None = None, align: int = 1 << 20) -> "Tier":
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

    def __enter__(self) -> "Tier":
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


def _start_run(options: StartOptions) -> RunConf:
    """Start a run's server, tied to this process, and the automatic engine beside it."""
    return engine_process.attach(server.start_run(options, tied=True))
