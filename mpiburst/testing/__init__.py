"""Helpers for testing mpiburst and its stores: a reference model of a file, and the store contract suite.

* :class:`Model`: the bytes a file must hold, as a plain ``bytearray``
  updated by the same writes in the same order;
* :func:`put`: commit writes to a store as one batch, as the write-back
  file's batches do, and apply them to a model (:func:`put_runs`: the same
  with strided runs among the writes);
* :class:`~mpiburst.testing.store.StoreTests`: every behaviour of the
  :class:`~mpiburst.store.Store` interface, for any implementation (import it
  from :mod:`mpiburst.testing.store`; it needs pytest and hypothesis).
"""

from __future__ import annotations

from ..store import MAX_EXTENT, Store


class Model:
    """The reference image of one file: writes in arrival order, truncations."""

    def __init__(self, initial: bytes = b"") -> None:
        self.data = bytearray(initial)

    def write(self, off: int, data: bytes) -> None:
        """Apply a write of ``data`` at ``off`` (the file grows with zeros as needed)."""
        if len(self.data) < off + len(data):
            self.data.extend(bytes(off + len(data) - len(self.data)))
        self.data[off:off + len(data)] = data

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes, or extend it with zeros."""
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))


def put(store: Store, path: str, model: Model | None, writes: list[tuple[int, bytes]], channel: int = 0) -> int:
    """Commit ``writes`` as one batch (split into extents of at most MAX_EXTENT) and apply them to ``model``.

    Returns the batch's first sequence number.
    """
    return put_runs(store, path, model, list(writes), channel)


def put_runs(store: Store, path: str, model: Model | None, writes: list[tuple], channel: int = 0) -> int:
    """Commit ``writes`` as one batch and apply them to ``model``; return the first sequence number.

    Each write is ``(offset, data)`` (split into extents of at most
    MAX_EXTENT) or ``(offset, data, length, stride)``: a strided run of
    ``len(data) // length`` blocks of ``length`` bytes, ``stride`` apart,
    one index entry (see :meth:`mpiburst.store.Store.commit`).
    """
    payload = bytearray()
    extents: list[tuple[int, ...]] = []
    for write in writes:
        off, data = write[0], write[1]
        if len(write) == 2:
            for s in range(0, len(data), MAX_EXTENT):
                piece = data[s:s + MAX_EXTENT]
                extents.append((off + s, len(payload), len(piece)))
                payload += piece
            if model is not None:
                model.write(off, data)
            continue
        length, stride = write[2], write[3]
        count = len(data) // length
        extents.append((off, len(payload), length, count, stride) if count > 1 else (off, len(payload), length))
        payload += data
        if model is not None:
            for k in range(count):
                model.write(off + k * stride, data[k * length:(k + 1) * length])
    return store.commit(path, channel, payload, extents)
