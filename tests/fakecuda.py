"""A CUDA runtime double for testing staging where there is no GPU (unit tests only).

It stands in for :class:`mpiburst.cuda.Runtime`: its "device memory" is host
memory it hands out and remembers (:meth:`HostRuntime.device_array`), and
``memory_type`` says "device" for pointers into it. What makes it a useful
double is timing: ``copy_async`` only queues a copy on its stream, and the
bytes move when that stream is synchronised, as a real asynchronous copy
completes at some later time. Code that reads a pinned buffer before waiting
for its copy, refills one still being copied, or returns before a copy to the
device has landed, sees stale bytes and fails its test. Copies between two
host pointers, or that do not touch pinned memory, are refused (staging never
does them). Every call is logged in order (``log``).

A real GPU run of the same paths is ``tests/test_gpu.py`` (skipped without a device).
"""

from __future__ import annotations

import ctypes
from collections import defaultdict
from typing import Any

import numpy as np

from mpiburst import cuda


class HostRuntime(cuda.Runtime):
    """The double: device memory, pinned memory and streams on the host, copies deferred to synchronisation."""

    name = "host-double"

    def __init__(self) -> None:
        self.device: list[np.ndarray] = []
        self.pinned: list[np.ndarray] = []
        self.queues: dict[Any, list[tuple[int, int, int]]] = defaultdict(list)
        self.log: list[tuple] = []
        self._streams = 0

    def device_array(self, data: np.ndarray) -> np.ndarray:
        """Return a copy of ``data`` in "device memory" (read it on the host only to check a test's result)."""
        arr = np.array(data, copy=True, order="K")
        self.device.append(arr)
        return arr

    def _within(self, arrays: list[np.ndarray], ptr: int, n: int) -> bool:
        return any(a.ctypes.data <= ptr and ptr + n <= a.ctypes.data + a.nbytes for a in arrays)

    def device_count(self) -> int:
        return 1

    def memory_type(self, ptr: int) -> int:
        self.log.append(("memory_type", ptr))
        return 2 if self._within(self.device, ptr, 1) else 0

    def host_alloc(self, nbytes: int) -> int:
        arr = np.full(nbytes, 0xEE, np.uint8)
        self.pinned.append(arr)
        return arr.ctypes.data

    def host_free(self, ptr: int) -> None:
        self.pinned = [a for a in self.pinned if a.ctypes.data != ptr]

    def stream_create(self) -> Any:
        self._streams += 1
        return 1000 + self._streams

    def stream_synchronize(self, stream: Any) -> None:
        self.log.append(("sync", stream))
        for dst, src, n in self.queues.pop(stream, []):
            ctypes.memmove(dst, src, n)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        down = self._within(self.device, src, nbytes) and self._within(self.pinned, dst, nbytes)
        up = self._within(self.pinned, src, nbytes) and self._within(self.device, dst, nbytes)
        assert down or up, "staging copies between device memory and pinned buffers only"
        self.log.append(("copy", "down" if down else "up", nbytes, stream))
        self.queues[stream].append((dst, src, nbytes))


class DeviceArray:
    """A "device" array of the double behind ``__cuda_array_interface__`` (version 3 with ``stream``)."""

    def __init__(self, rt: HostRuntime, data: np.ndarray, stream: int | None = None, readonly: bool = False):
        self.array = rt.device_array(data)
        a = self.array
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, readonly),
                                         "strides": None if a.flags.c_contiguous else a.strides, "version": 3,
                                         "stream": stream}


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int), ("device_id", ctypes.c_int),
                ("ndim", ctypes.c_int), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class DLPackDeviceArray:
    """A DLPack (0.x, unversioned) producer of a "device" array of the double on ``kDLCUDA`` (or ``device_type``).

    Its capsules have no destructor: the object keeps the tensor alive. ``streams`` records what
    ``__dlpack__`` was asked for.
    """

    def __init__(self, rt: HostRuntime, data: np.ndarray, device_type: int = 2):
        self.array = rt.device_array(np.ascontiguousarray(data))
        self.device_type = device_type
        self.streams: list[Any] = []
        self._shape = (ctypes.c_int64 * self.array.ndim)(*self.array.shape)
        kinds = {"i": 0, "u": 1, "f": 2}
        self._managed = _DLManagedTensor(_DLTensor(self.array.ctypes.data, device_type, 0, self.array.ndim,
                                                   kinds[self.array.dtype.kind], self.array.dtype.itemsize * 8, 1,
                                                   self._shape, None, 0), None, None)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device_type, 0

    def __dlpack__(self, stream: Any = None) -> Any:
        self.streams.append(stream)
        return _capsule_new(ctypes.addressof(self._managed), b"dltensor", None)
