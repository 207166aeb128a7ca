"""What memory a buffer object names: host bytes, or bytes on a CUDA device.

mpi4py takes, in this order, the buffer protocol, DLPack
(``__dlpack__``/``__dlpack_device__``) and the CUDA array interface
(``__cuda_array_interface__``, versions 0 to 3); mpiburst takes the same,
plus ``__array_interface__`` alone. :func:`decode` turns such an object into
a flat byte ``memoryview`` of host memory, or a :class:`DeviceMemory` that
:mod:`mpiburst.staging` copies through pinned host buffers.

Which memory a pointer is in is decided honestly for both cases:

* without a CUDA runtime that sees a device (:func:`mpiburst.cuda.runtime`
  is None), a ``__cuda_array_interface__`` pointer cannot be device memory:
  it is taken as host memory, as a non-CUDA-aware MPI takes it (mpi4py's
  own tests put host arrays behind that interface);
* with one, ``cudaPointerGetAttributes`` tells: device and managed memory
  are staged, plain and pinned host memory is used in place.

DLPack names its device: ``kDLCPU`` and ``kDLCUDAHost`` are host memory,
``kDLCUDA`` and ``kDLCUDAManaged`` need the runtime (else
:class:`~mpiburst.errors.DeviceBufferError`), other devices are refused.
A producer's ``stream`` (array interface version 3) is synchronised before
the bytes are used; DLPack producers are asked to order their work before
the legacy default stream, which mpiburst's copy streams wait for.
Buffers must be contiguous in C or Fortran order, as in mpi4py.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import cuda
from .errors import DeviceBufferError

#: DLPack device types.
DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED = 1, 2, 3, 13
#: DLPack's read-only flag (versioned capsules).
_DL_READONLY = 1
#: DLPack dtype codes and the numpy kind of each.
_DL_KINDS = {0: "i", 1: "u", 2: "f", 5: "c", 6: "b"}
#: The legacy default stream, as DLPack's ``stream`` argument names it.
_LEGACY_STREAM = 1


@dataclass(frozen=True)
class DeviceMemory:
    """``nbytes`` bytes at ``ptr`` in CUDA device (or managed) memory, reached through ``runtime``.

    ``owner`` is kept referenced while the bytes are used (the array, or its DLPack capsule).
    """

    ptr: int
    nbytes: int
    readonly: bool
    runtime: cuda.Runtime
    owner: Any

    def __len__(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class Described:
    """An array's memory as its interface describes it (after the contiguity and read-only checks).

    ``device`` is True for device memory (staged), False for memory the host may touch.
    """

    ptr: int
    nbytes: int
    readonly: bool
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    device: bool
    runtime: Any
    owner: Any


def decode(obj: Any, writable: bool) -> memoryview | DeviceMemory:
    """Return a flat byte view, in memory order, of a host buffer, or the :class:`DeviceMemory` it names.

    Raises
    ------
    mpiburst.errors.DeviceBufferError
        Device memory that cannot be staged (DLPack ``kDLCUDA`` without a
        CUDA runtime, a device other than CUDA).
    TypeError, BufferError
        As mpi4py raises them: not a buffer, not contiguous, or read-only
        where a buffer to read into is needed.
    """
    try:
        view = memoryview(obj)
    except TypeError:
        found = interface(obj)
        if isinstance(found, np.ndarray):
            view = found.data
        else:
            if writable and found.readonly:
                raise BufferError("Object is not writable.") from None
            if found.device:
                return DeviceMemory(found.ptr, found.nbytes, found.readonly, found.runtime, found.owner)
            view = host_view(found.ptr, found.nbytes, found.readonly, found.owner)
    return _flat(view, writable)


def _flat(view: memoryview, writable: bool) -> memoryview:
    if writable and view.readonly:
        raise BufferError("Object is not writable.")
    if not view.contiguous:
        raise BufferError("buffer is not contiguous")
    if not view.c_contiguous:  # Fortran order: its bytes in memory order, as MPI.File takes them
        view = np.asarray(view).T.data
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def interface(obj: Any) -> np.ndarray | Described:
    """Read an object without the buffer protocol, in mpi4py's order: DLPack, CUDA array interface; then
    ``__array_interface__`` (a numpy array of it).

    Raises
    ------
    TypeError
        For an object that speaks none of them.
    """
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return _dlpack(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        return _cuda_array(obj)
    if hasattr(obj, "__array_interface__"):
        return np.asarray(obj)
    raise TypeError("message: expecting buffer or list/tuple")


class _HostMemory:
    """Host memory at an address, as numpy's array interface (keeps its owner alive with the view)."""

    def __init__(self, ptr: int, nbytes: int, readonly: bool, owner: Any) -> None:
        self.owner = owner
        self.__array_interface__ = {"data": (ptr, readonly), "shape": (nbytes,), "typestr": "|u1", "version": 3}


def host_view(ptr: int, nbytes: int, readonly: bool, owner: Any) -> memoryview:
    """Return a byte view of ``nbytes`` of host memory at ``ptr`` that keeps ``owner`` alive."""
    if nbytes == 0:
        return memoryview(b"") if readonly else memoryview(bytearray())
    return np.asarray(_HostMemory(ptr, nbytes, readonly, owner)).data


# -- __cuda_array_interface__ -------------------------------------------------------------------

def _cuda_array(obj: Any) -> Described:
    """Read ``__cuda_array_interface__`` (versions 0 to 3), checked as mpi4py checks it."""
    cai = obj.__cuda_array_interface__
    ptr, readonly = cai["data"]
    typestr = cai["typestr"]
    shape = tuple(int(s) for s in cai["shape"])
    if cai.get("mask") is not None:
        raise BufferError("__cuda_array_interface__: cannot handle masked arrays")
    try:
        dtype = np.dtype(typestr)
    except TypeError:
        raise BufferError(f"__cuda_array_interface__: typestr {typestr!r} is not a type numpy knows") from None
    if typestr[:1] in "<>" and dtype.byteorder not in ("=", "|"):
        raise BufferError(f"__cuda_array_interface__: typestr {typestr!r} with non-native byte order")
    size = math.prod(shape)
    if size < 0:
        raise BufferError(f"__cuda_array_interface__: buffer with negative size (shape:{shape})")
    strides = cai.get("strides")
    fortran = False
    if strides is not None and size > 1:
        strides = tuple(int(s) for s in strides)
        c_order, fortran = _contiguous(shape, strides, dtype.itemsize)
        if not c_order and not fortran:
            raise BufferError(f"__cuda_array_interface__: buffer is not contiguous "
                              f"(shape:{shape}, strides:{strides}, itemsize:{dtype.itemsize})")
        fortran = fortran and not c_order
    ptr = int(ptr or 0)
    nbytes = size * dtype.itemsize
    if nbytes and not ptr:
        raise BufferError(f"__cuda_array_interface__: NULL data pointer for {nbytes} bytes")
    rt = cuda.runtime() if nbytes else None
    device = rt is not None and rt.memory_type(ptr) in cuda.DEVICE_TYPES
    stream = cai.get("stream")
    if rt is not None and stream is not None:
        if int(cai.get("version", 0)) >= 3 and stream == 0:
            raise ValueError("__cuda_array_interface__: stream 0 is not allowed (version 3): use 1 for the "
                             "legacy default stream or 2 for the per-thread one")
        rt.stream_synchronize(int(stream))
    return Described(ptr, nbytes, bool(readonly), dtype, shape, fortran, device, rt, obj)


def _contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[bool, bool]:
    """Return whether ``strides`` lay ``shape`` out C-contiguous, and Fortran-contiguous (dims of 1 free)."""

    def dense(order: list[int]) -> bool:
        step = itemsize
        for i in order:
            if shape[i] > 1 and strides[i] != step:
                return False
            step *= shape[i]
        return True

    dims = list(range(len(shape)))
    return dense(dims[::-1]), dense(dims)


# -- DLPack ---------------------------------------------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype, _capsule_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]


def _dlpack(obj: Any) -> Described:
    """Read an object's DLPack capsule, as mpi4py does: never consumed (renamed), kept as the memory's owner.

    A consumer that takes the capsule over (``numpy.from_dlpack``) calls
    the producer's deleter later; producers that free the tensor with the
    capsule (mpi4py's own test arrays do) then crash the process.
    """
    kind, index = (int(v) for v in obj.__dlpack_device__())
    on_host = kind in (DL_CPU, DL_CUDA_HOST)
    if not on_host and kind not in (DL_CUDA, DL_CUDA_MANAGED):
        raise DeviceBufferError(f"this buffer is on DLPack device type {kind} (device {index}), which mpiburst "
                                "cannot reach: it stages CUDA devices only; copy it to the host first.")
    rt = None if on_host else cuda.runtime()
    if rt is None and not on_host:
        raise DeviceBufferError(f"this buffer is on CUDA device {index} (DLPack), but no CUDA runtime with a "
                                "device loads in this process: install cupy or cuda-python (or put libcudart "
                                "on the library path, or set MPIBURST_CUDART), or copy it to the host first.")
    sync = {} if kind == DL_CPU else {"stream": _LEGACY_STREAM}
    try:
        capsule = obj.__dlpack__(max_version=(1, 0), copy=False, **sync)
    except TypeError:   # a producer of DLPack before 1.0
        capsule = obj.__dlpack__(**sync)
    if _capsule_valid(capsule, b"dltensor_versioned"):
        managed = _DLManagedTensorVersioned.from_address(_capsule_pointer(capsule, b"dltensor_versioned"))
        if managed.major != 1:
            raise BufferError(f"dlpack: unsupported major version {managed.major}")
        tensor, readonly = managed.dl_tensor, bool(managed.flags & _DL_READONLY)
    elif _capsule_valid(capsule, b"dltensor"):
        tensor = _DLManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor")).dl_tensor
        readonly = False
    else:
        raise BufferError("dlpack: invalid capsule object")
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    dt = tensor.dtype
    kind_char = _DL_KINDS.get(dt.code)
    if kind_char is None or dt.lanes != 1:
        dtype = np.dtype(f"V{(dt.bits * dt.lanes + 7) // 8}")
    else:
        dtype = np.dtype(f"{kind_char}{dt.bits // 8}") if kind_char != "b" else np.dtype(bool)
    fortran = False
    if tensor.strides and math.prod(shape) > 1:
        strides = tuple(tensor.strides[i] * dtype.itemsize for i in range(tensor.ndim))
        c_order, fortran = _contiguous(shape, strides, dtype.itemsize)
        if not c_order and not fortran:
            raise BufferError("dlpack: buffer is not contiguous")
        fortran = fortran and not c_order
    ptr = int(tensor.data or 0) + int(tensor.byte_offset)
    nbytes = math.prod(shape) * dtype.itemsize
    return Described(ptr, nbytes, readonly, dtype, shape, fortran, not on_host, rt, capsule)
