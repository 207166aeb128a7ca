"""Parallel HDF5 output without parallel HDF5: real ranks, a real server, real h5py and h5dump.

Run by tests/run.sh under ``mpiexec -n 2`` and ``-n 4`` with
``python -m mpi4py -m pytest --with-mpi``.
"""

from __future__ import annotations

import os
import subprocess

import h5py
import numpy as np
import pytest

import mpiburst
from mpiburst import h5 as mh5
from mpiburst.errors import CollectiveError
from mpiburst.tier import Tier

from conftest import require_tool

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

SHAPE2 = (37, 23)
SHAPE3 = (9, 10, 11)


def _global(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The array every rank can compute: each element its own flat index (plus a fraction)."""
    return (np.arange(int(np.prod(shape))) * 1.25).astype(dtype).reshape(shape)


def _rows(n: int, rank: int, size: int) -> slice:
    return slice(rank * n // size, (rank + 1) * n // size)


def _block(shape: tuple[int, ...], rank: int, size: int) -> tuple[slice, ...]:
    """A 2 x (size/2) block decomposition of the first two axes (size is even: 2 or 4)."""
    rows, cols = 2, max(size // 2, 1)
    i, j = divmod(rank, cols)
    return (_rows(shape[0], i, rows), _rows(shape[1], j, cols)) + (slice(None),) * (len(shape) - 2)


def test_parallel_write_2d_and_3d_by_rows_and_blocks(mpi_tmp_path, server_binary):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    assert size % 2 == 0, "run with an even number of ranks"
    h5dump = require_tool("h5dump")   # same answer on every rank: all skip (or, in CI, fail) together
    bfs = mpi_tmp_path / "bfs"
    if rank == 0:
        bfs.mkdir()
    comm.Barrier()
    specs = {"rows/u2": (SHAPE2, "f8"), "blocks/u2": (SHAPE2, "f8"),
             "rows/u3": (SHAPE3, "i4"), "blocks/u3": {"shape": SHAPE3, "dtype": "<f4", "attrs": {"units": "K"}}}
    expected = {name: _global(spec[0] if isinstance(spec, tuple) else spec["shape"],
                              spec[1] if isinstance(spec, tuple) else spec["dtype"])
                for name, spec in specs.items()}
    with Tier.start(comm, id="h5mpi", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="128M",
                    server=server_binary):
        pf = mh5.parallel_create("burst://out.h5", comm, specs, attrs={"/": {"ranks": size}})
        for name, arr in expected.items():
            sel = (_rows(arr.shape[0], rank, size),) if name.startswith("rows") else _block(arr.shape, rank, size)
            pf.write(name, sel, arr[sel])
        pf.close()

        # Before any flush: every rank reads the whole file back through the tier.
        with mh5.File("burst://out.h5", "r", comm=comm) as f:
            for name, arr in expected.items():
                np.testing.assert_array_equal(f[name][()], arr, err_msg=name)
            assert f.attrs["ranks"] == size and f["blocks/u3"].attrs["units"] == "K"

        report = mpiburst.sync("burst://out.h5", comm=comm)
        path = os.path.join(str(bfs), "out.h5")
        if rank == 0:
            assert report.size == os.path.getsize(path)
            with h5py.File(path, "r") as f:  # plain h5py on the flushed BFS file
                for name, arr in expected.items():
                    assert f[name].dtype == arr.dtype and f[name].chunks is None
                    np.testing.assert_array_equal(f[name][()], arr, err_msg=name)
                assert f.attrs["ranks"] == size
            done = subprocess.run([h5dump, path], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and done.stderr == "", done.stderr
            assert 'DATASET "u3"' in done.stdout
        comm.Barrier()


def test_parallel_refusals_and_write_refusal_on_every_rank(mpi_tmp_path, server_binary):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bfs = mpi_tmp_path / "bfs"
    if comm.Get_rank() == 0:
        bfs.mkdir()
    comm.Barrier()
    with Tier.start(comm, id="h5ref", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="64M",
                    server=server_binary):
        for spec, what in [({"shape": (8,), "dtype": "f8", "chunks": True}, "chunked"),
                           ({"shape": (8,), "dtype": "f8", "compression": "lzf"}, "compressed"),
                           (((8,), h5py.vlen_dtype("i4")), "variable-length")]:
            with pytest.raises(ValueError, match=what):
                mh5.parallel_create("burst://bad.h5", comm, {"d": spec})
        with pytest.raises(ValueError, match="parallel_create"):
            mh5.File("burst://bad.h5", "w", comm=comm)
        comm.Barrier()
        assert not os.path.exists(os.path.join(str(bfs), "bad.h5"))
        # one rank's bad selection raises on every rank (the others would otherwise go on alone)
        pf = mh5.parallel_create("burst://ok.h5", comm, {"d": {"shape": (8,), "dtype": "f8"}})
        last = comm.Get_size() - 1
        mine = comm.Get_rank() == last
        with pytest.raises(KeyError if mine else CollectiveError, match="no dataset 'nope'"):
            pf.write("nope" if mine else "d", None if mine else slice(0, 1), np.zeros(1))
        pf.write("d", slice(comm.Get_rank(), comm.Get_rank() + 1), np.full(1, comm.Get_rank()))   # still usable
        pf.close()
