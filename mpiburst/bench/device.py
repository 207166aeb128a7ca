"""``mpiburst bench --device cuda``: device memory to the tier, against host memory and the copy limit.

For each transfer size every rank writes ``--size`` bytes in calls of that
size (the segmented pattern: its own contiguous part of one shared file)
through :class:`mpiburst.File`, once from host memory (numpy) and once from
device memory (a CuPy array, staged through pinned buffers by
:mod:`mpiburst.staging`), and copies the same device bytes to pinned host
memory with nothing else: the device-to-host limit that staging cannot beat.
Each time runs from a barrier to the slowest rank's end (``Close``
included: the bytes are in the tier); figures are medians of ``--repeat``
runs, interleaved, and the device run's bytes are read back and compared on
the first repeat.
"""

from __future__ import annotations

import statistics
from functools import partial
from time import perf_counter
from typing import Any

import numpy as np

from .. import cuda, memory, staging
from ..errors import ConfigError
from .report import short_size


def check() -> Any:
    """Return ``cupy`` where a CUDA device is usable; else raise :class:`ConfigError` (one sentence)."""
    if cuda.runtime() is None:
        raise ConfigError("--device cuda: no CUDA device is visible to this process (no CUDA runtime among cupy, "
                          "cuda-python and libcudart sees one); run it on a GPU node, or leave out --device.")
    try:
        import cupy
    except ImportError:
        raise ConfigError("--device cuda needs cupy to allocate device memory; install it "
                          "(pip install cupy-cuda12x) or leave out --device.") from None
    return cupy


def runtime_name() -> str:
    """The binding through which the CUDA runtime was loaded (``cupy``, ``cuda-python``, ``libcudart``)."""
    rt = cuda.runtime()
    return rt.name if rt is not None else "none"


def _discard(at: int, chunk: memoryview) -> None:
    """A sink that drops the staged bytes: what is left is the device-to-host copy."""


def _timed(comm: Any, action: Any) -> float:
    """Seconds from a barrier until the slowest rank finished ``action``."""
    from mpi4py import MPI

    comm.Barrier()
    t0 = perf_counter()
    action()
    return comm.allreduce(perf_counter() - t0, op=MPI.MAX)


def _absorb(comm: Any, url: str, base: int, buf: Any, transfer: int) -> None:
    """Write ``buf`` at ``base`` of ``url`` in calls of ``transfer`` bytes, then close (collective)."""
    from mpi4py import MPI

    from ..file import File

    f = File.Open(comm, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    for at in range(0, len(buf), transfer):
        f.Write_at(base + at, buf[at:at + transfer])
    f.Close()


def _verify(comm: Any, url: str, base: int, expected: np.ndarray) -> bool:
    from mpi4py import MPI

    from ..file import File

    back = np.empty_like(expected)
    f = File.Open(comm, url, MPI.MODE_RDONLY)
    f.Read_at(base, back)
    f.Close()
    return bool(comm.allreduce(int(np.array_equal(back, expected)), op=MPI.MIN))


def run(comm: Any, cp: Any, transfers: list[int], size: int, repeat: int) -> list[dict[str, Any]]:
    """Measure every transfer size ``repeat`` times; return one row per size (every rank, the same rows)."""
    from ..file import File

    rows = []
    for transfer in transfers:
        per_rank = size // transfer * transfer
        host = np.random.default_rng(comm.rank).integers(0, 256, per_rank, dtype=np.uint8)
        dev = cp.asarray(host)
        cp.cuda.Device().synchronize()
        staged = memory.decode(dev, False)
        assert isinstance(staged, memory.DeviceMemory), "cupy allocated host memory"
        base = comm.rank * per_rank
        seconds: dict[str, list[float]] = {"copy": [], "host": [], "device": []}
        ok = True
        for i in range(repeat):
            for kind, buf in (("host", host), ("device", dev)):
                url = f"burst://device-bench/{kind}-{transfer}.dat"
                seconds[kind].append(_timed(comm, partial(_absorb, comm, url, base, buf, transfer)))
                if i == 0 and kind == "device":
                    ok = _verify(comm, url, base, host)
                comm.Barrier()
                if comm.rank == 0:
                    File.Delete(url)
                comm.Barrier()
            seconds["copy"].append(_timed(comm, partial(staging.download, staged, 0, per_rank, _discard)))
        total = per_rank * comm.size
        rate = {k: total / statistics.median(v) / 1e9 for k, v in seconds.items()}
        rows.append({"transfer": transfer, "total_bytes": total, "seconds": seconds, "verified": ok,
                     "GBps": rate, "device_vs_host": rate["device"] / rate["host"],
                     "device_vs_copy": rate["device"] / rate["copy"]})
    return rows


def table(rows: list[dict[str, Any]], ranks: int, size: int, repeat: int, runtime: str) -> str:
    """The figures as a text table, with the ratios against host memory and the copy limit."""
    head = ["transfer", "D2H copy GB/s", "host→tier GB/s", "device→tier GB/s", "device/host", "device/copy"]
    lines = [f"mpiburst bench --device cuda: {ranks} ranks x {short_size(size)}, median of {repeat} "
             f"(CUDA runtime: {runtime})", " | ".join(head)]
    for r in rows:
        g = r["GBps"]
        mark = "" if r["verified"] else " !"
        lines.append(" | ".join([short_size(r["transfer"]), f"{g['copy']:.2f}", f"{g['host']:.2f}",
                                 f"{g['device']:.2f}{mark}", f"{r['device_vs_host']:.2f}",
                                 f"{r['device_vs_copy']:.2f}"]))
    return "\n".join(lines)
