"""Device buffers on a real GPU, with CuPy (#26): skipped, with one line, on a machine without one.

The same paths as ``tests/test_device_buffers.py``, whose runtime double
stands in for CUDA on machines without a GPU: here the real runtime (CuPy's
binding, as mpiburst loads it first) stages real device memory through real
pinned buffers, on a real server. ``conftest.require_cuda_device`` decides;
CI has no GPU, so these are skipped there and that is not a failure
(docs/ci.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from conftest import require_cuda_device
from mpiburst import cuda, memory, staging
from mpiburst.file import File
from parity import CudaInterfaceOnly

pytestmark = pytest.mark.timeout(300)
RW = MPI.MODE_CREATE | MPI.MODE_RDWR


@pytest.fixture
def cp():
    return require_cuda_device()


class DLPackOnly:
    """A CuPy array seen through DLPack alone (``kDLCUDA``)."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_the_runtime_tells_device_from_host_memory(cp):
    assert cuda.runtime().name == "cupy"
    assert isinstance(memory.decode(cp.arange(4), False), memory.DeviceMemory)
    assert isinstance(memory.decode(CudaInterfaceOnly(np.arange(4)), False), memoryview)   # host memory, in place
    pinned = cp.cuda.alloc_pinned_memory(64)
    host = np.frombuffer(pinned, np.uint8, 64)
    assert isinstance(memory.decode(CudaInterfaceOnly(host), False), memoryview)


def test_large_device_writes_and_reads_through_file(cp, tier):
    n = 3 * staging.CHUNK + 4099
    src = cp.random.randint(0, 256, n, dtype=cp.uint8)
    with File.Open(MPI.COMM_SELF, "burst://gpu.dat", RW) as f:
        st = MPI.Status()
        f.Write_at(7, src, st)
        assert st.Get_count(MPI.BYTE) == n
        back = cp.zeros(n + 10, cp.uint8)
        f.Read_at(7, back, st)
        assert st.Get_count(MPI.BYTE) == n
        assert bool((back[:n] == src).all()) and not bool(back[n:].any())
        via = cp.zeros(n, cp.uint8)
        f.Read_at(7, DLPackOnly(via))
        assert bool((via == src).all())


def test_a_producer_stream_is_waited_for(cp, tier):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        src = cp.arange(1 << 22, dtype=cp.int64) * 3        # queued on the stream, maybe not done yet
        assert src.__cuda_array_interface__.get("stream") not in (None, 0)
        with File.Open(MPI.COMM_SELF, "burst://stream.dat", RW) as f:
            f.Write_at(0, src)
            host = np.zeros(1 << 22, np.int64)
            f.Read_at(0, host)
    assert (host == np.arange(1 << 22, dtype=np.int64) * 3).all()


def test_datatypes_with_holes_and_file_objects_on_the_device(cp, tier):
    vec = MPI.INT.Create_vector(4, 1, 3).Commit()
    try:
        with File.Open(MPI.COMM_SELF, "burst://holes.dat", RW) as f:
            f.Write_at(0, [cp.arange(10, dtype=cp.int32) + 100, 1, vec])
            into = cp.full(10, -1, cp.int32)
            f.Read_at(0, [into, 1, vec])
            assert cp.asnumpy(into).tolist() == [100, -1, -1, 103, -1, -1, 106, -1, -1, 109]
    finally:
        vec.Free()
    data = cp.random.randint(0, 256, staging.CHUNK + 5, dtype=cp.uint8)
    with mpiburst.open("burst://obj.dat", "w+b", tier=tier) as fh:
        fh.write(data)
        fh.seek(0)
        back = cp.zeros_like(data)
        assert fh.readinto(back) == data.size and bool((back == data).all())


def test_bench_device_cuda_prints_its_three_figures(cp, cli):
    result = cli("bench", "--device", "cuda", "--transfer", "1m,16m", "--size", "64m", "--repeat", "1",
                 "--capacity", "1G", timeout=240)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("mpiburst bench --device cuda: 1 ranks x 64") and "(CUDA runtime: cupy)" in lines[0]
    assert [line.split(" | ")[0] for line in lines[2:]] == ["1m", "16m"]
    assert all(float(v) > 0 for line in lines[2:] for v in line.split(" | ")[1:4])
