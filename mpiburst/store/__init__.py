"""The tier store: the one boundary between mpiburst and the server that holds a run's data.

:class:`Store` (in :mod:`.base`) is the interface; :class:`RedisStore` (a
Redis or Valkey server), :class:`ClusterStore` (one server per node of a
multi-node run, joined into one cluster) and :class:`MemoryStore` (this
process's memory, for unit tests) implement it. A :class:`~mpiburst.tier.Tier` hands out its store
as ``tier.store``. Key names, scripts and the decoding of the server's replies
live in :mod:`.schema`; they and the server's exceptions never leave this package.
A store over several nodes also says where each file's data lies (:class:`Placement`).
"""

from .base import (
                   MAX_BLOB,
                   MAX_EXTENT,
                   MAX_SPAN,
                   BatchWriter,
                   Blob,
                   ChannelState,
                   FileMeta,
                   FlushLease,
                   NewFile,
                   Placement,
                   RecordGone,
                   Store,
                   batch_end,
                   file_id,
)
from .cluster_store import ClusterStore
from .memory import MemoryStore
from .redis_store import RedisStore

__all__ = ["MAX_BLOB", "MAX_EXTENT", "MAX_SPAN", "BatchWriter", "Blob", "ChannelState", "ClusterStore", "FileMeta",
           "FlushLease", "MemoryStore", "NewFile", "Placement", "RecordGone", "RedisStore", "Store", "batch_end", "file_id"]
