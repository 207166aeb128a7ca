"""mpiburst: a per-job burst buffer for MPI jobs.

Ranks write through :class:`File` (the names of ``mpi4py.MPI.File``) or
:func:`open` (a Python file object) into a Redis-protocol tier started for the
job (:class:`Tier`); :func:`sync` flushes files to the backing filesystem as
large aligned writes, :func:`commit` a consistent cut of all of them; :func:`purge`, :func:`pin`, :func:`unpin`,
:func:`prestage` and :func:`frag_stat` control what stays in the tier;
:func:`listdir` and :func:`rmtree` list and remove directories of ``burst://`` paths.

Attributes are imported on first use, so ``import mpiburst`` is cheap and
does not initialise MPI. Importing it installs a ``sys.excepthook`` that
prints an uncaught :class:`MpiburstError` as one line
(:func:`mpiburst.errors.install_excepthook`; ``MPIBURST_DEBUG=1`` for the
traceback).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    ChannelBusyError,
    ChannelError,
    CheckpointError,
    CollectiveError,
    ConfigError,
    DeviceBufferError,
    FlushError,
    MpiburstError,
    NodeLostError,
    OffsetError,
    PathError,
    PolicyError,
    ReplicaError,
    ServerError,
    TierConnectionError,
    TierFullError,
    install_excepthook,
)

if TYPE_CHECKING:   # what __getattr__ loads on first use, for type checkers: a user's mypy sees the real types
    from . import h5
    from .checkpoint import Checkpoints
    from .file import File, Request
    from .fileobj import open
    from .flush import FlushReport, commit, sync
    from .residency import FragStat, frag_stat, listdir, pin, prestage, purge, rmtree, unpin
    from .tier import Tier

# An uncaught mpiburst error prints one line, not a traceback with chained redis-py ones
# (MPIBURST_DEBUG=1 restores it); other exceptions are left to the hook already in place.
install_excepthook()

__version__ = "0.1.0"

_LAZY = {
    "Tier": "tier",
    "File": "file",
    "Request": "file",
    "open": "fileobj",
    "sync": "flush",
    "commit": "flush",
    "FlushReport": "flush",
    "purge": "residency",
    "pin": "residency",
    "unpin": "residency",
    "prestage": "residency",
    "frag_stat": "residency",
    "FragStat": "residency",
    "listdir": "residency",
    "rmtree": "residency",
    "Checkpoints": "checkpoint",
    "h5": None,
}

# A literal list, so that type checkers read it (tests/test_public_api.py checks it is complete).
__all__ = [
    "AuthenticationError",
    "ChannelBusyError",
    "ChannelError",
    "CheckpointError",
    "Checkpoints",
    "CollectiveError",
    "ConfigError",
    "DeviceBufferError",
    "File",
    "FlushError",
    "FlushReport",
    "FragStat",
    "MpiburstError",
    "NodeLostError",
    "OffsetError",
    "PathError",
    "PolicyError",
    "ReplicaError",
    "Request",
    "ServerError",
    "Tier",
    "TierConnectionError",
    "TierFullError",
    "__version__",
    "commit",
    "frag_stat",
    "h5",
    "listdir",
    "open",
    "pin",
    "prestage",
    "purge",
    "rmtree",
    "sync",
    "unpin",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mpiburst' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
