"""Memory buffer specs, as mpi4py takes them for file I/O, turned into byte runs.

A *message* is what ``MPI.File`` calls ``buf``: a buffer as
:func:`mpiburst.memory.decode` reads it (buffer protocol, DLPack,
``__cuda_array_interface__``, ``__array_interface__``), optionally in a list
``[buf, datatype]``, ``[buf, count, datatype]``, ``[buf, (count, displ),
datatype]`` or ``[buf, count, displ, datatype]``. :func:`message` resolves it
to a flat byte view of the whole buffer plus the runs the datatype selects;
:meth:`Message.gather` and :meth:`Message.scatter` move the selected bytes to
and from the contiguous stream the file sees. Device buffers are refused.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from . import staging
from .datatypes import Layout, layout
from .memory import DeviceMemory, decode

#: The layout of a plain buffer: bytes.
_BYTES = layout(MPI.BYTE)


class Message:
    """The bytes a buffer spec selects: ``count`` instances of ``lay`` from byte ``base`` of ``raw``.

    ``nbytes`` is the data it carries (count times the datatype's size).
    ``raw`` is host memory, or device memory (then :attr:`device` is it).
    """

    __slots__ = ("raw", "base", "count", "lay", "nbytes")

    def __init__(self, raw: memoryview | DeviceMemory, base: int, count: int, lay: Layout):
        self.raw, self.base, self.count, self.lay = raw, base, count, lay
        self.nbytes = count * lay.size

    @property
    def device(self) -> DeviceMemory | None:
        """The device memory the message is in, or None for host memory."""
        raw = self.raw
        return raw if isinstance(raw, DeviceMemory) else None

    def run(self) -> tuple[int, int] | None:
        """Return ``(start, length)`` of the selected bytes in the buffer when they are one run, else None."""
        if self.lay.contiguous:
            return self.base, self.nbytes
        offs, lens = self.lay.tiled(self.count, self.base)
        return (int(offs[0]), int(lens[0])) if len(offs) == 1 else None

    def contiguous(self) -> memoryview | None:
        """Return the selected bytes as one slice of host memory, or None if they have holes or are on a device."""
        if isinstance(self.raw, DeviceMemory):
            return None
        if self.lay.contiguous:
            if self.base == 0 and self.nbytes == len(self.raw):
                return self.raw
            return self.raw[self.base:self.base + self.nbytes]
        offs, lens = self.lay.tiled(self.count, self.base)
        if len(offs) == 1:
            return self.raw[int(offs[0]):int(offs[0] + lens[0])]
        return None

    def gather(self) -> memoryview:
        """Return the selected bytes in type-map order, as one contiguous stream (in host memory)."""
        raw = self.raw
        if isinstance(raw, DeviceMemory):
            run = self.run()
            if self.nbytes == 0:
                return memoryview(b"")
            if run is not None:
                copy = memoryview(bytearray(run[1]))
                staging.to_host(raw, run[0], copy)
                return copy
            return self._on_host(raw)[0].gather()
        view = self.contiguous()
        if view is not None:
            return view
        offs, lens = self.lay.tiled(self.count, self.base)
        out = bytearray(self.nbytes)
        _copy_runs(np.frombuffer(raw, dtype=np.uint8), offs, lens, np.frombuffer(out, dtype=np.uint8),
                   to_stream=True)
        return memoryview(out)

    def scatter(self, stream: memoryview) -> None:
        """Copy ``stream`` (the first bytes of the message, in type-map order) into the buffer."""
        n = len(stream)
        if n == 0:
            return
        raw = self.raw
        if isinstance(raw, DeviceMemory):
            run = self.run()
            if run is not None:
                staging.from_host(raw, run[0], stream)
                return
            host, copy, lo = self._on_host(raw)     # the holes keep their bytes: copied down, filled, copied back
            host.scatter(stream)
            staging.from_host(raw, lo, copy)
            return
        offs, lens = self.lay.tiled(self.count, self.base)
        if n < self.nbytes:
            cut = int(np.searchsorted(np.cumsum(lens), n, side="left"))
            offs, lens = offs[:cut + 1].copy(), lens[:cut + 1].copy()
            lens[-1] -= int(lens.sum()) - n
        _copy_runs(np.frombuffer(raw, dtype=np.uint8), offs, lens,
                   np.frombuffer(stream, dtype=np.uint8), to_stream=False)

    def _on_host(self, dev: DeviceMemory) -> tuple[Message, memoryview, int]:
        """Copy the device bytes the message spans to the host: the message over the copy, the copy, its first byte."""
        offs, lens = self.lay.tiled(self.count, self.base)
        lo, hi = int(offs.min()), int((offs + lens).max())
        copy = memoryview(bytearray(hi - lo))
        staging.to_host(dev, lo, copy)
        return Message(copy, self.base - lo, self.count, self.lay), copy, lo


def _copy_runs(mem: np.ndarray, offs: np.ndarray, lens: np.ndarray, stream: np.ndarray, to_stream: bool) -> None:
    """Copy between the runs ``(offs, lens)`` of ``mem`` and the consecutive bytes of ``stream``.

    A regular pattern (equal lengths, equal steps) is one strided numpy copy;
    anything else is a loop over the runs.
    """
    n = len(offs)
    if n == 0:
        return
    ln = int(lens[0])
    step = int(offs[1] - offs[0]) if n > 1 else ln
    regular = bool(np.all(lens == ln)) and (n == 1 or bool(np.all(np.diff(offs) == step)))
    if regular and step >= 0:
        first = int(offs[0])
        grid = np.lib.stride_tricks.as_strided(mem[first:], shape=(n, ln), strides=(step, 1))
        flat = stream[:n * ln].reshape(n, ln)
        if to_stream:
            flat[...] = grid
        else:
            grid[...] = flat
        return
    pos = 0
    for o, ln in zip(offs.tolist(), lens.tolist()):
        if to_stream:
            stream[pos:pos + ln] = mem[o:o + ln]
        else:
            mem[o:o + ln] = stream[pos:pos + ln]
        pos += ln


def datatype(spec: Any) -> MPI.Datatype:
    """Return the MPI datatype for ``spec`` (a Datatype or a typecode, as mpi4py maps them)."""
    if isinstance(spec, MPI.Datatype):
        return spec
    try:
        return dtlib.from_numpy_dtype(spec)
    except (TypeError, ValueError):
        raise KeyError(f"cannot map {spec!r} to MPI datatype") from None


def _absolute(dtype: MPI.Datatype, count: int) -> Message:
    """The message ``[MPI.BOTTOM, count, dtype]``: a datatype built from absolute addresses (``MPI.Get_address``)."""
    lay = layout(dtype)
    offs, lens = lay.tiled(count)
    if len(offs) == 0:
        return Message(memoryview(b""), 0, count, lay)
    lo, hi = int(offs.min()), int((offs + lens).max())
    if lo <= 0:
        raise ValueError("message: MPI.BOTTOM needs a datatype of absolute addresses (MPI.Get_address)")
    span = (ctypes.c_ubyte * (hi - lo)).from_address(lo)
    return Message(memoryview(span).cast("B"), -lo, count, lay)


def message(buf: Any, writable: bool) -> Message:
    """Resolve an mpi4py buffer spec into a :class:`Message`.

    Raises the exception types mpi4py raises for bad specs (``ValueError``,
    ``TypeError``, ``KeyError``, ``BufferError``).
    """
    count = displ = None
    dtype = None
    if isinstance(buf, (list, tuple)):
        if not 2 <= len(buf) <= 4:
            raise ValueError("message: expecting 2 to 4 items")
        obj, dtype = buf[0], datatype(buf[-1])
        if len(buf) == 3:
            count = buf[1]
            if isinstance(count, tuple):
                count, displ = count
        elif len(buf) == 4:
            count, displ = buf[1], buf[2]
    else:
        obj = buf
    if obj is MPI.BOTTOM and dtype is not None:
        return _absolute(dtype, 1 if count is None else count)
    raw = decode(obj, writable)
    if dtype is None:
        return Message(raw, 0, len(raw), _BYTES)
    lay = layout(dtype)
    entries = len(raw) // lay.extent if lay.extent > 0 else 0
    if count is None:
        if lay.extent <= 0 or len(raw) % lay.extent:
            raise ValueError(f"message: cannot infer count, buffer length {len(raw)} is not a multiple of "
                             f"datatype extent {lay.extent} (lb:{lay.lb}, ub:{lay.lb + lay.extent})")
        count = entries - (displ or 0)
    displ = displ or 0
    if displ < 0 or (displ > entries and lay.extent > 0):
        raise ValueError(f"message: displacement {displ} out of bounds, number of datatype entries {entries}")
    if count < 0:
        raise ValueError(f"message: negative count {count}")
    msg = Message(raw, displ * lay.extent, count, lay)
    if lay.contiguous:
        if msg.base + msg.nbytes > len(raw):
            raise ValueError("message: buffer is too small for the count and displacement given")
    elif msg.nbytes:
        offs, lens = lay.tiled(count, msg.base)
        if int(offs.min()) < 0 or int((offs + lens).max()) > len(raw):
            raise ValueError("message: buffer is too small for the count and displacement given")
    return msg
