"""Buffers beyond the buffer protocol (#26): ``__cuda_array_interface__`` and DLPack, on the host and on a device.

Without a CUDA runtime a CUDA-interface pointer is host memory, used in
place. Device memory is exercised through the runtime double of
``tests/fakecuda.py`` (copies land only when their stream is synchronised),
on the memory tier: these are unit tests of the staging logic. The real
runtime bindings are exercised by ``tests/test_cuda_binding.py`` (a
stand-in libcudart) and ``tests/test_gpu.py`` (a real GPU, skipped without one).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from fakecuda import DeviceArray, DLPackDeviceArray, HostRuntime
from mpiburst import cuda, memory, staging
from mpiburst.errors import DeviceBufferError
from mpiburst.file import File
from parity import CudaInterfaceOnly, DLPackOnly

RW = MPI.MODE_CREATE | MPI.MODE_RDWR


@pytest.fixture
def no_cuda(monkeypatch):
    """A process without a CUDA runtime (or without a device), as on this machine and in CI."""
    monkeypatch.setattr(cuda, "runtime", lambda: None)


@pytest.fixture
def gpu(monkeypatch) -> HostRuntime:
    """The runtime double as the process's CUDA runtime, with 64 KiB staging chunks (several per test buffer)."""
    rt = HostRuntime()
    monkeypatch.setattr(cuda, "runtime", lambda: rt)
    monkeypatch.setattr(staging, "CHUNK", 64 << 10)
    return rt


def ramp(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# -- host memory behind the interfaces ---------------------------------------------------------

@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_without_a_runtime_a_cuda_interface_pointer_is_host_memory_used_in_place(no_cuda, version):
    arr = np.arange(10, dtype=np.int32)
    view = memory.decode(CudaInterfaceOnly(arr, version=version), writable=True)
    assert isinstance(view, memoryview) and bytes(view) == arr.tobytes()
    view[:4] = b"\xff\xff\xff\x7f"
    assert arr[0] == 2**31 - 1      # the same memory, not a copy


def test_cuda_interface_layouts_as_mpi4py_takes_them(no_cuda):
    f = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    assert bytes(memory.decode(CudaInterfaceOnly(f, strides=True), False)) == f.tobytes(order="F")
    col = np.arange(6, dtype=np.int64).reshape(6, 1)   # a dimension of 1 may have any stride
    odd = CudaInterfaceOnly(col)
    odd.__cuda_array_interface__["strides"] = (8, 999)
    assert bytes(memory.decode(odd, False)) == col.tobytes()
    with pytest.raises(BufferError, match="not contiguous"):
        memory.decode(CudaInterfaceOnly(np.zeros((4, 4))[:, ::2], strides=True), False)
    with pytest.raises(BufferError, match="not writable"):
        memory.decode(CudaInterfaceOnly(np.zeros(3), readonly=True), writable=True)
    assert bytes(memory.decode(CudaInterfaceOnly(np.ones(2), readonly=True), writable=False)) == np.ones(2).tobytes()
    empty = CudaInterfaceOnly(np.zeros(0))
    empty.__cuda_array_interface__["data"] = (None, False)
    assert len(memory.decode(empty, True)) == 0
    null = CudaInterfaceOnly(np.zeros(4))
    null.__cuda_array_interface__["data"] = (0, False)
    with pytest.raises(BufferError, match="NULL"):
        memory.decode(null, False)


def test_dlpack_capsules_are_read_in_place_and_never_consumed():
    """A consumed capsule's deleter is the consumer's to call; mpi4py's test arrays free their tensor with
    the capsule, so a consumer that took it over (numpy.from_dlpack) crashed the process later."""
    arr = np.arange(8, dtype=np.float32)
    capsules = []

    class Producer(DLPackOnly):
        def __dlpack__(self, **kwargs):
            capsules.append(super().__dlpack__(**kwargs))
            return capsules[-1]

    view = memory.decode(Producer(arr), writable=True)
    view[:4] = np.float32(7).tobytes()
    assert arr[0] == 7
    valid = ctypes.pythonapi.PyCapsule_IsValid
    valid.restype, valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    assert valid(capsules[0], b"dltensor_versioned") == 1       # not renamed "used_dltensor_versioned"


def test_host_arrays_and_numpy_views_are_unaffected(mem_tier, no_cuda):
    base = np.arange(64, dtype=np.uint8)
    with File.Open(MPI.COMM_SELF, "burst://views.dat", RW) as f:
        f.Write_at(0, base[8:24])                         # a contiguous numpy view: its bytes
        with pytest.raises(BufferError, match="not contiguous"):
            f.Write_at(0, base[::2])
        out = np.zeros(16, np.uint8)
        f.Read_at(0, out[:])
        assert out.tolist() == list(range(8, 24))
    fh = mpiburst.open("burst://views2.dat", "w+b", tier=mem_tier)
    fh.write(base[8:24])
    with pytest.raises(TypeError):
        fh.write(base[::2])                               # as io's file objects: a C-contiguous buffer
    fh.seek(0)
    back = bytearray(16)
    assert fh.readinto(back) == 16 and bytes(back) == bytes(range(8, 24))
    fh.close()


# -- device memory, through the runtime double -------------------------------------------------

def test_the_runtime_tells_device_memory_from_host_memory(gpu):
    host = np.arange(5, dtype=np.int32)
    assert isinstance(memory.decode(CudaInterfaceOnly(host), True), memoryview)
    dev = DeviceArray(gpu, np.arange(5, dtype=np.int32))
    found = memory.decode(dev, True)
    assert isinstance(found, memory.DeviceMemory) and found.ptr == dev.array.ctypes.data and len(found) == 20


def test_a_large_write_from_the_device_overlaps_its_copies_with_the_tier_writes(gpu):
    """download(): the next chunk's copy is queued before the current chunk is handed to the writer."""
    data = ramp(5 * staging.CHUNK + 123)
    dev = memory.decode(DeviceArray(gpu, data), False)
    seen = bytearray()

    def sink(at, chunk):
        assert at == len(seen)
        seen.extend(chunk)
        gpu.log.append(("sink", at))

    staging.download(dev, 0, len(data), sink)
    assert bytes(seen) == data.tobytes()
    steps = [e[0] for e in gpu.log if e[0] in ("copy", "sync", "sink")]
    first_sink = steps.index("sink")
    assert steps[:first_sink].count("copy") == 2          # chunk 1's copy runs while chunk 0 is written


def test_device_buffers_through_mpiburst_file(gpu, mem_tier):
    data = ramp(3 * staging.CHUNK + 77, seed=2)
    with File.Open(MPI.COMM_SELF, "burst://dev.dat", RW) as f:
        st = MPI.Status()
        f.Write_at(5, DeviceArray(gpu, data), st)
        assert st.Get_count(MPI.BYTE) == len(data)
        host = bytearray(len(data) + 5)
        f.Read_at(0, host)
        assert bytes(host[5:]) == data.tobytes()
        into = DeviceArray(gpu, np.zeros(len(data) + 100, np.uint8))
        f.Read_at(5, into, st)                            # a short read: the end of the file
        assert st.Get_count(MPI.BYTE) == len(data)
        assert into.array[:len(data)].tobytes() == data.tobytes() and not into.array[len(data):].any()
    ups = [e for e in gpu.log if e[:2] == ("copy", "up")]
    assert len(ups) == 4 and sum(e[2] for e in ups) == len(data)    # chunk by chunk, the last one short


def test_device_datatypes_and_views_with_holes_keep_the_holes(gpu, mem_tier):
    vec = MPI.INT.Create_vector(4, 1, 3).Commit()        # every third int of 10
    try:
        src = np.arange(10, dtype=np.int32) + 100
        with File.Open(MPI.COMM_SELF, "burst://holes.dat", RW) as f:
            f.Write_at(0, [DeviceArray(gpu, src), 1, vec])
            back = np.zeros(4, np.int32)
            f.Read_at(0, back)
            assert back.tolist() == [100, 103, 106, 109]
            into = DeviceArray(gpu, np.full(10, -1, np.int32))
            f.Read_at(0, [into, 1, vec])
            assert into.array.tolist() == [100, -1, -1, 103, -1, -1, 106, -1, -1, 109]
            f.Set_view(0, MPI.INT, vec)                    # a noncontiguous file view, a contiguous device buffer
            f.Write_at(0, DeviceArray(gpu, np.arange(8, dtype=np.int32)))
            whole = DeviceArray(gpu, np.zeros(8, np.int32))
            f.Read_at(0, whole)
            assert whole.array.tolist() == list(range(8))
    finally:
        vec.Free()


def test_a_producer_stream_is_synchronised_before_its_bytes_are_used(gpu, mem_tier):
    dev = DeviceArray(gpu, np.arange(4, dtype=np.int64), stream=77)
    with File.Open(MPI.COMM_SELF, "burst://stream.dat", RW) as f:
        f.Write_at(0, dev)
    kinds = [e for e in gpu.log if e[0] in ("sync", "copy")]
    assert kinds[0] == ("sync", 77)
    bad = DeviceArray(gpu, np.arange(4), stream=0)
    with pytest.raises(ValueError, match="stream 0"):
        memory.decode(bad, False)


def test_dlpack_on_a_cuda_device_needs_the_runtime_and_is_staged_with_it(no_cuda, monkeypatch):
    rt = HostRuntime()
    producer = DLPackDeviceArray(rt, np.arange(6, dtype=np.int32))
    with pytest.raises(DeviceBufferError, match="no CUDA runtime") as refused:
        memory.decode(producer, False)
    assert "\n" not in str(refused.value)
    pinned_host = DLPackDeviceArray(rt, np.arange(6, dtype=np.int32), device_type=3)   # kDLCUDAHost
    assert bytes(memory.decode(pinned_host, False)) == np.arange(6, dtype=np.int32).tobytes()
    monkeypatch.setattr(cuda, "runtime", lambda: rt)
    found = memory.decode(producer, True)
    assert isinstance(found, memory.DeviceMemory) and found.nbytes == 24
    assert producer.streams[-1] == 1        # the producer orders its work before the legacy default stream
    out = np.zeros(6, np.int32)
    staging.to_host(found, 0, memoryview(out).cast("B"))
    assert out.tolist() == list(range(6))


def test_mpiburst_open_takes_device_buffers(gpu, mem_tier):
    data = ramp(2 * staging.CHUNK + 9, seed=3)
    fh = mpiburst.open("burst://obj.dat", "w+b", tier=mem_tier)
    assert fh.write(DeviceArray(gpu, data)) == len(data)
    assert fh.write(CudaInterfaceOnly(np.arange(3, dtype=np.uint8))) == 3      # host memory, in place
    fh.seek(0)
    into = DeviceArray(gpu, np.zeros(len(data) + 3, np.uint8))
    assert fh.readinto(into) == len(data) + 3
    assert into.array[:len(data)].tobytes() == data.tobytes() and into.array[len(data):].tolist() == [0, 1, 2]
    small = DeviceArray(gpu, np.zeros(10, np.uint8))
    fh.seek(1)
    assert fh.readinto(small) == 10 and small.array.tobytes() == data[1:11].tobytes()
    fh.close()


def test_host_array_gives_numpy_the_declared_dtype_and_shape(gpu):
    arr = staging.host_array(DeviceArray(gpu, np.arange(12, dtype=np.float64).reshape(3, 4)))
    assert arr.shape == (3, 4) and arr.dtype == np.float64 and arr[2, 3] == 11
    f = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    same = staging.host_array(CudaInterfaceOnly(f, strides=True))
    assert same.tolist() == f.tolist() and same.ctypes.data == f.ctypes.data     # host memory: a view, no copy


def test_h5_parallel_write_takes_device_and_interface_arrays(gpu, mem_tier):
    from mpiburst import h5 as mh5

    u = np.arange(24, dtype="f8").reshape(4, 6)
    with mh5.parallel_create("burst://dev.h5", MPI.COMM_SELF, {"u": (u.shape, u.dtype)}) as pf:
        pf.write("u", np.s_[:2], DeviceArray(gpu, u[:2]))                     # device memory: staged
        pf.write("u", np.s_[2:], CudaInterfaceOnly(u[2:].astype("f4")))       # host memory, converted to f8
    with mh5.File("burst://dev.h5", "r", tier=mem_tier) as f:
        np.testing.assert_array_equal(f["u"][()], u)
