"""The CUDA runtime, loaded on first use through whichever is present: CuPy, cuda-python or libcudart.

mpiburst neither needs nor imports CUDA to run. The runtime is looked for
only when a buffer with ``__cuda_array_interface__`` or on a CUDA DLPack
device reaches it (:mod:`mpiburst.memory`), once per process, and the answer
is kept: a :class:`Runtime` when a runtime loads *and* sees at least one
device, else None. Only the calls that staging needs are bound (device
count, a pointer's memory type, pinned host memory, streams, asynchronous
copies), each as the same small method on three bindings:

* CuPy (``cupy.cuda.runtime``), when ``import cupy`` works;
* cuda-python (``cuda.bindings.runtime``, or the older ``cuda.cudart``);
* the runtime library itself through ctypes: ``$MPIBURST_CUDART`` if set,
  else ``libcudart.so`` as the dynamic loader finds it, else the one of the
  ``nvidia-cuda-runtime`` wheel.

Every copy uses ``cudaMemcpyDefault`` (the direction follows from unified
addressing) on streams created with ``cudaStreamCreate``, which wait for
work queued on the legacy default stream before them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import os
import threading
from typing import Any

from .errors import DeviceBufferError

#: ``cudaMemoryType`` values: memory the host may touch directly, and memory it may not.
HOST_TYPES = (0, 1)          # cudaMemoryTypeUnregistered, cudaMemoryTypeHost (pinned)
DEVICE_TYPES = (2, 3)        # cudaMemoryTypeDevice, cudaMemoryTypeManaged
#: ``cudaMemcpyDefault``: the direction is inferred from the pointers (unified virtual addressing).
_COPY_DEFAULT = 4

_lock = threading.Lock()
_loaded = False
_runtime: Runtime | None = None


class Runtime:
    """The calls of the CUDA runtime that staging uses, with errors turned into one sentence.

    ``name`` says which binding provides them (``cupy``, ``cuda-python``,
    ``libcudart``). Streams are opaque handles as the binding gives them.
    """

    name = "none"

    def device_count(self) -> int:
        """Return the number of CUDA devices this process sees (0 when the driver or devices are missing)."""
        raise NotImplementedError

    def memory_type(self, ptr: int) -> int:
        """Return the ``cudaMemoryType`` of ``ptr`` (0 for memory CUDA does not know: plain host memory)."""
        raise NotImplementedError

    def host_alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` of pinned (page-locked) host memory; return its address."""
        raise NotImplementedError

    def host_free(self, ptr: int) -> None:
        """Free pinned host memory from :meth:`host_alloc`."""
        raise NotImplementedError

    def stream_create(self) -> Any:
        """Create a stream (blocking: it waits for earlier work on the legacy default stream)."""
        raise NotImplementedError

    def stream_synchronize(self, stream: Any) -> None:
        """Wait until every operation queued on ``stream`` (a handle or a raw ``cudaStream_t`` int) is done."""
        raise NotImplementedError

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """Queue a copy of ``nbytes`` from ``src`` to ``dst`` (any of host, pinned or device memory) on ``stream``."""
        raise NotImplementedError

    def _failed(self, call: str, code: Any) -> DeviceBufferError:
        return DeviceBufferError(f"the CUDA runtime ({self.name}) refused {call} with error {code}: check the "
                                 "device and the buffer (nvidia-smi, the array's own checks) and try again.")


class CupyRuntime(Runtime):
    """The runtime as CuPy binds it (``cupy.cuda.runtime``)."""

    name = "cupy"

    def __init__(self, rt: Any) -> None:
        self._rt = rt

    def _call(self, call: str, *args: Any) -> Any:
        try:
            return getattr(self._rt, call)(*args)
        except self._rt.CUDARuntimeError as exc:
            raise self._failed(call, exc) from None

    def device_count(self) -> int:
        try:
            return int(self._rt.getDeviceCount())
        except self._rt.CUDARuntimeError:
            return 0

    def memory_type(self, ptr: int) -> int:
        try:
            return int(self._rt.pointerGetAttributes(ptr).type)
        except self._rt.CUDARuntimeError:
            return 0

    def host_alloc(self, nbytes: int) -> int:
        return int(self._call("hostAlloc", nbytes, 0))

    def host_free(self, ptr: int) -> None:
        self._call("freeHost", ptr)

    def stream_create(self) -> Any:
        return self._call("streamCreate")

    def stream_synchronize(self, stream: Any) -> None:
        self._call("streamSynchronize", stream)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self._call("memcpyAsync", dst, src, nbytes, _COPY_DEFAULT, stream)


class CudaPythonRuntime(Runtime):
    """The runtime as cuda-python binds it (every call returns ``(error, value...)``)."""

    name = "cuda-python"

    def __init__(self, rt: Any) -> None:
        self._rt = rt
        self._ok = rt.cudaError_t.cudaSuccess

    def _call(self, call: str, *args: Any) -> Any:
        err, *value = getattr(self._rt, call)(*args)
        if err != self._ok:
            raise self._failed(call, err)
        return value[0] if value else None

    def device_count(self) -> int:
        err, n = self._rt.cudaGetDeviceCount()
        return int(n) if err == self._ok else 0

    def memory_type(self, ptr: int) -> int:
        err, attrs = self._rt.cudaPointerGetAttributes(ptr)
        if err != self._ok:
            self._rt.cudaGetLastError()   # older runtimes refuse unregistered host memory and keep the error
            return 0
        return int(attrs.type)

    def host_alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMallocHost", nbytes))

    def host_free(self, ptr: int) -> None:
        self._call("cudaFreeHost", ptr)

    def stream_create(self) -> Any:
        return self._call("cudaStreamCreate")

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDefault, stream)


class CudartRuntime(Runtime):
    """The runtime library (``libcudart``) called through ctypes."""

    name = "libcudart"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        p, vp, sz = ctypes.POINTER, ctypes.c_void_p, ctypes.c_size_t
        for call, args in {"cudaGetDeviceCount": [p(ctypes.c_int)], "cudaPointerGetAttributes": [vp, vp],
                           "cudaGetLastError": [], "cudaMallocHost": [p(vp), sz], "cudaFreeHost": [vp],
                           "cudaStreamCreate": [p(vp)], "cudaStreamSynchronize": [vp],
                           "cudaMemcpyAsync": [vp, vp, sz, ctypes.c_int, vp]}.items():
            fn = getattr(lib, call)
            fn.argtypes, fn.restype = args, ctypes.c_int

    def _check(self, call: str, err: int) -> None:
        if err:
            raise self._failed(call, err)

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        return n.value if self._lib.cudaGetDeviceCount(ctypes.byref(n)) == 0 else 0

    def memory_type(self, ptr: int) -> int:
        attrs = (ctypes.c_int * 16)()   # cudaPointerAttributes starts with its cudaMemoryType; room to spare
        if self._lib.cudaPointerGetAttributes(attrs, ctypes.c_void_p(ptr)):
            self._lib.cudaGetLastError()
            return 0
        return attrs[0]

    def host_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check("cudaMallocHost", self._lib.cudaMallocHost(ctypes.byref(ptr), nbytes))
        return int(ptr.value or 0)

    def host_free(self, ptr: int) -> None:
        self._check("cudaFreeHost", self._lib.cudaFreeHost(ptr))

    def stream_create(self) -> Any:
        stream = ctypes.c_void_p()
        self._check("cudaStreamCreate", self._lib.cudaStreamCreate(ctypes.byref(stream)))
        return int(stream.value or 0)

    def stream_synchronize(self, stream: Any) -> None:
        self._check("cudaStreamSynchronize", self._lib.cudaStreamSynchronize(stream))

    def copy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self._check("cudaMemcpyAsync", self._lib.cudaMemcpyAsync(dst, src, nbytes, _COPY_DEFAULT, stream))


def runtime() -> Runtime | None:
    """Return the process's CUDA runtime, loading it on the first call; None without a runtime or a device."""
    global _loaded, _runtime
    with _lock:
        if not _loaded:
            _runtime = _load()
            _loaded = True
    return _runtime


def _load() -> Runtime | None:
    """Return the first binding that loads and sees a device, in the order CuPy, cuda-python, libcudart."""
    for make in (_cupy, _cuda_python, _cudart):
        try:
            rt = make()
        except Exception:   # noqa: BLE001 - a binding that fails to load in any way is not there
            continue
        if rt is not None and rt.device_count() > 0:
            return rt
    return None


def _cupy() -> Runtime:
    return CupyRuntime(importlib.import_module("cupy.cuda.runtime"))


def _cuda_python() -> Runtime:
    try:
        rt = importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        rt = importlib.import_module("cuda.cudart")
    return CudaPythonRuntime(rt)


def _cudart() -> Runtime | None:
    for name in _cudart_candidates():
        try:
            return CudartRuntime(ctypes.CDLL(name))
        except OSError:
            continue
    return None


def _cudart_candidates() -> list[str]:
    """Where libcudart may be: the setting, the loader's search, the ``nvidia-cuda-runtime`` wheel."""
    names = [os.environ["MPIBURST_CUDART"]] if os.environ.get("MPIBURST_CUDART") else []
    found = ctypes.util.find_library("cudart")
    names += [found] if found else []
    names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    try:
        wheel = importlib.import_module("nvidia.cuda_runtime")
        for folder in getattr(wheel, "__path__", []):
            lib = os.path.join(folder, "lib")
            if os.path.isdir(lib):
                names += sorted(os.path.join(lib, f) for f in os.listdir(lib) if f.startswith("libcudart.so"))
    except ImportError:
        pass
    return names
