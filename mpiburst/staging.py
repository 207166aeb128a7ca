"""Bytes between CUDA device memory and the host, through pinned host buffers, copies overlapping the I/O.

The tier is reached through host memory (a socket), so device bytes are
staged: each transfer borrows the process's two pinned buffers of
:data:`CHUNK` bytes, each with its own stream. :func:`download` hands the
device bytes over chunk by chunk while the copy of the next chunk runs, so a
large write to the tier overlaps its device-to-host copies; :func:`upload`
has the caller fill one buffer while the other's host-to-device copy runs,
so reads land in device memory the same way. Pinned memory is allocated
once (``cudaMallocHost`` is slow) and kept for the process.
:func:`host_array` gives numpy-only APIs (h5py) any such buffer as a numpy array.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import cuda
from .memory import DeviceMemory, host_view, interface

#: Bytes of one pinned staging buffer (two per runtime): large enough that each tier write is
#: sent straight from it (the default write-back buffer is 4 MiB), small enough to overlap.
CHUNK = 8 << 20


@dataclass
class _Buffer:
    ptr: int
    view: memoryview
    stream: Any


class _Pool:
    """Two pinned buffers and their streams, for one transfer at a time."""

    def __init__(self, rt: cuda.Runtime) -> None:
        self.lock = threading.Lock()
        self.rt = rt
        self.buffers: list[_Buffer] = []

    def take(self) -> list[_Buffer]:
        if not self.buffers:
            for _ in range(2):
                ptr = self.rt.host_alloc(CHUNK)
                self.buffers.append(_Buffer(ptr, host_view(ptr, CHUNK, False, None), self.rt.stream_create()))
        return self.buffers


_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


@contextmanager
def _staging(rt: cuda.Runtime) -> Iterator[list[_Buffer]]:
    """Lend the runtime's two pinned buffers; on the way out, wait for every copy still running on them."""
    with _pools_lock:
        pool = _pools.get(id(rt))
        if pool is None or pool.rt is not rt:
            pool = _pools[id(rt)] = _Pool(rt)
    with pool.lock:
        buffers = pool.take()
        try:
            yield buffers
        finally:
            for b in buffers:
                rt.stream_synchronize(b.stream)


def download(dev: DeviceMemory, lo: int, n: int, sink: Callable[[int, memoryview], None]) -> None:
    """Hand bytes ``[lo, lo + n)`` of ``dev`` to ``sink(at, chunk)``, chunk by chunk, in pinned host memory.

    A chunk is valid only during its call; the next chunk's copy runs while
    ``sink`` uses this one.
    """
    rt = dev.runtime
    with _staging(rt) as buffers:
        def start(k: int) -> None:
            at = k * CHUNK
            b = buffers[k % 2]
            rt.copy_async(b.ptr, dev.ptr + lo + at, min(CHUNK, n - at), b.stream)

        if n > 0:
            start(0)
        for k, at in enumerate(range(0, n, CHUNK)):
            if at + CHUNK < n:
                start(k + 1)        # into the buffer the previous call of sink had: it is done with it
            b = buffers[k % 2]
            rt.stream_synchronize(b.stream)
            sink(at, b.view[:min(CHUNK, n - at)])


def upload(dev: DeviceMemory, lo: int, n: int, fill: Callable[[int, memoryview], int]) -> int:
    """Fill bytes ``[lo, lo + n)`` of ``dev``: ``fill(at, chunk)`` writes host bytes and returns how many.

    A short fill ends the transfer (the end of a file); return the bytes
    copied. Each chunk's copy to the device runs while the next is filled.
    """
    rt = dev.runtime
    got = 0
    with _staging(rt) as buffers:
        for k, at in enumerate(range(0, n, CHUNK)):
            b = buffers[k % 2]
            want = min(CHUNK, n - at)
            rt.stream_synchronize(b.stream)      # its previous copy is done before it is refilled
            c = fill(at, b.view[:want])
            if c > 0:
                rt.copy_async(dev.ptr + lo + at, b.ptr, c, b.stream)
            got += c
            if c < want:
                break
    return got


def to_host(dev: DeviceMemory, lo: int, out: memoryview) -> None:
    """Copy ``len(out)`` bytes of ``dev`` from byte ``lo`` into the host memory ``out``."""

    def sink(at: int, chunk: memoryview) -> None:
        out[at:at + len(chunk)] = chunk

    download(dev, lo, len(out), sink)


def from_host(dev: DeviceMemory, lo: int, data: memoryview) -> None:
    """Copy the host bytes ``data`` into ``dev`` from byte ``lo``."""

    def fill(at: int, chunk: memoryview) -> int:
        chunk[:] = data[at:at + len(chunk)]
        return len(chunk)

    upload(dev, lo, len(data), fill)


def host_array(obj: Any) -> np.ndarray:
    """Return ``obj`` as a numpy array of host memory: itself, a view of its host memory, or a copy from the device.

    For array APIs that take numpy only (h5py): what
    :func:`mpiburst.memory.decode` accepts, with the dtype and shape its
    interface declares.
    """
    try:
        memoryview(obj)
        return np.asarray(obj)
    except TypeError:
        found = interface(obj)
    if isinstance(found, np.ndarray):
        return found
    if not found.device:
        raw = np.asarray(host_view(found.ptr, found.nbytes, found.readonly, found.owner))
    else:
        raw = np.empty(found.nbytes, np.uint8)
        to_host(DeviceMemory(found.ptr, found.nbytes, found.readonly, found.runtime, found.owner), 0, raw.data)
    return raw.view(found.dtype).reshape(found.shape, order="F" if found.fortran else "C")
