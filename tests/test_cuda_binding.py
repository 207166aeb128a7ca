"""The libcudart binding of ``mpiburst/cuda.py`` against a stand-in runtime library (#26).

There is no GPU and no CUDA here, so a small C library with the runtime's
calls and signatures (``cudaGetDeviceCount``, ``cudaPointerGetAttributes``,
``cudaMallocHost``, ``cudaStreamCreate``, ``cudaMemcpyAsync``, ...) is built
with gcc; its "device memory" is host memory it hands out and recognises. A
fresh Python process loads it through ``$MPIBURST_CUDART`` (CuPy and
cuda-python blocked), so the ctypes binding (argument types, pointers by
reference, error codes) and the loader's "no device means no runtime" rule
run for real. The real runtime on a real device: ``tests/test_gpu.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, cli_env, require_tool

pytestmark = pytest.mark.timeout(120)

STANDIN = r"""
#include <stdlib.h>
#include <string.h>
static char *dev[8]; static size_t devn[8]; static int ndev, copies, syncs;
void *standinDeviceAlloc(size_t n) { dev[ndev] = calloc(n, 1); devn[ndev] = n; return dev[ndev++]; }
int standinCopies(void) { return copies; }
int standinSyncs(void) { return syncs; }
int cudaGetDeviceCount(int *n) {
    const char *e = getenv("STANDIN_DEVICES"); int d = e ? atoi(e) : 1;
    if (!d) return 100;                                   /* cudaErrorNoDevice */
    *n = d; return 0;
}
int cudaPointerGetAttributes(int *attr, const void *p) {
    attr[0] = 0;
    for (int i = 0; i < ndev; i++)
        if ((const char *)p >= dev[i] && (const char *)p < dev[i] + devn[i]) attr[0] = 2;
    return 0;
}
int cudaGetLastError(void) { return 0; }
int cudaMallocHost(void **p, size_t n) { *p = malloc(n); return *p ? 0 : 2; }
int cudaFreeHost(void *p) { free(p); return 0; }
int cudaStreamCreate(void **s) { static long k; *s = (void *)(16 * ++k); return 0; }
int cudaStreamSynchronize(void *s) { syncs++; return s ? 0 : 400; }
int cudaMemcpyAsync(void *d, const void *s, size_t n, int kind, void *st) {
    if (kind != 4 || !st) return 1;                       /* cudaMemcpyDefault on a created stream only */
    memcpy(d, s, n); copies++; return 0;
}
"""

SCRIPT = textwrap.dedent("""
    import ctypes, os, sys
    sys.modules["cupy"] = sys.modules["cuda"] = None        # only the library of $MPIBURST_CUDART
    import numpy as np
    import mpiburst
    from mpiburst import cuda, staging
    from mpiburst.tier import Tier

    lib = ctypes.CDLL(os.environ["MPIBURST_CUDART"])
    lib.standinDeviceAlloc.restype = ctypes.c_void_p
    lib.standinDeviceAlloc.argtypes = [ctypes.c_size_t]
    staging.CHUNK = 1 << 16
    n = 200_000
    data = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)

    class Dev:
        def __init__(self, ptr):
            self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                             "stream": None}

    src, dst = lib.standinDeviceAlloc(n), lib.standinDeviceAlloc(n)
    ctypes.memmove(src, data.ctypes.data, n)
    tier = Tier.memory(sys.argv[1])
    with mpiburst.open("burst://b.dat", "w+b", tier=tier) as fh:
        fh.write(Dev(src))
        fh.seek(0)
        got = fh.readinto(Dev(dst))
    rt = cuda.runtime()
    back = (ctypes.c_ubyte * n).from_address(dst)
    print(rt.name if rt else None, got, bytes(back) == data.tobytes(), lib.standinCopies(), lib.standinSyncs() > 0)
""")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    gcc = require_tool("gcc")
    folder = tmp_path_factory.mktemp("cudart")
    (folder / "standin.c").write_text(STANDIN)
    lib = folder / "libcudart.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(folder / "standin.c")], check=True,
                   timeout=60)
    return lib


def _run(standin, tmp_path, devices: str) -> list[str]:
    (tmp_path / "bfs").mkdir()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "bfs")],
                          env=cli_env(MPIBURST_CUDART=str(standin), STANDIN_DEVICES=devices),
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_the_libcudart_binding_stages_device_memory(standin, tmp_path):
    name, got, same, copies, synced = _run(standin, tmp_path, "1")
    assert (name, got, same, synced) == ("libcudart", "200000", "True", "True")
    assert int(copies) == 2 * 4         # 200,000 bytes in 64 KiB chunks: 4 copies down, 4 up


def test_a_runtime_without_a_device_is_no_runtime(standin, tmp_path):
    """cudaGetDeviceCount failing (no device): the pointer is host memory, used in place with no copy."""
    name, got, same, copies, _ = _run(standin, tmp_path, "0")
    assert (name, got, same, copies) == ("None", "200000", "True", "0")
