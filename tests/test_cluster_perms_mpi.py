"""BFS permissions with real ranks: what mpiburst.File and parallel HDF5 output leave on the BFS (#17).

Every rank is the application, with a group-writable umask (002); the flush
runs afterwards under another umask (077), as the engine or ``mpiburst
run``'s commit may. Each file and directory the flush makes is compared with
what the same ranks give a direct write in the same directory: ``MPI.File``
on the BFS, h5py's own ``open``, ``os.makedirs``. Three layouts: one server
(a plain store), one server with the drain writing chunks while the file is
open (``MPIBURST_DRAIN=1``), and one server per node in one cluster (a
ClusterStore; every rank a node unless ``MPIBURST_RANKS_PER_NODE`` says
otherwise, as ``tests/run.sh``'s third pass at ``-n 6`` does).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

import mpiburst
from mpiburst import drain, nodes
from mpiburst import h5 as mh5
from mpiburst.store.cluster_store import ClusterStore
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
APP, FLUSHER = 0o002, 0o077


@pytest.fixture(params=["one server", "drain", "cluster"])
def layout(request, monkeypatch) -> str:
    """How the run is laid out; sets the environment the tier and the driver read."""
    if request.param == "cluster":
        if not os.environ.get(nodes.RANKS_PER_NODE):
            monkeypatch.setenv(nodes.RANKS_PER_NODE, "1")
    else:
        monkeypatch.delenv(nodes.RANKS_PER_NODE, raising=False)
    if request.param == "drain":
        monkeypatch.setenv(drain.ENV, "1")
    else:
        monkeypatch.delenv(drain.ENV, raising=False)
    return request.param


def _attrs(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_flushed_files_and_directories_get_what_a_direct_write_by_the_ranks_gets(mpi_tmp_path, server_binary,
                                                                                  layout, monkeypatch):
    bfs = mpi_tmp_path / "bfs"
    if rank == 0:
        bfs.mkdir()
    comm.Barrier()
    launcher = os.umask(FLUSHER)     # the server, the engine and the flush: a private umask
    try:
        tier = Tier.start(comm, id="perm", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="128M",
                          server=server_binary)
        with tier:
            assert isinstance(tier.store, ClusterStore) == (layout == "cluster")
            monkeypatch.setattr(drain, "CHUNK", 2 * tier.align)   # a small drain chunk: two stripes
            chunk = drain.chunk_bytes(tier.align)
            os.umask(APP)                                    # the application's ranks
            if layout == "drain" and rank == 0:
                os.makedirs(bfs / "proj/run")   # the drain writes beside its file: into an existing directory
            comm.Barrier()
            f = mpiburst.File.Open(comm, "burst://proj/run/out.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
            assert (f._drain is not None) == (layout == "drain")
            block = np.full(chunk if layout == "drain" else 4096, rank, dtype=np.uint8)
            f.Write_at(rank * block.size, block)               # rank r: all of drain chunk r
            if layout == "drain":
                f.Sync()
                deadline = time.monotonic() + 60
                while rank not in f._drain.done:               # a bounded wait for this rank's chunk
                    assert time.monotonic() < deadline, "the drain wrote nothing"
                    time.sleep(0.01)
            f.Close()
            with mh5.parallel_create("burst://proj/run/fields.h5", comm, {"u": ((size, 8), "f8")}) as pf:
                pf.write("u", (slice(rank, rank + 1), slice(None)), np.full((1, 8), rank, dtype="f8"))

            os.umask(FLUSHER)                                  # the flush runs with another umask
            report = mpiburst.sync("burst://proj/run/out.dat", comm=comm)
            assert (report.drained == size * chunk) == (layout == "drain")
            mpiburst.sync("burst://proj/run/fields.h5", comm=comm)

            os.umask(APP)                                      # the same ranks writing directly
            direct = MPI.File.Open(comm, str(bfs / "proj/run/direct.dat"), MPI.MODE_WRONLY | MPI.MODE_CREATE)
            direct.Write_at(rank * 4096, block[:4096])
            direct.Close()
            if rank == 0:
                os.makedirs(bfs / "ref/run")
                with h5py.File(bfs / "proj/run/direct.h5", "w") as h:
                    h["u"] = np.zeros((size, 8))
            os.umask(FLUSHER)
            comm.Barrier()
            found = None
            if rank == 0:
                run = bfs / "proj/run"
                found = {"file": (_attrs(run / "out.dat"), _attrs(run / "direct.dat")),
                         "h5": (_attrs(run / "fields.h5"), _attrs(run / "direct.h5")),
                         "top dir": (_attrs(bfs / "proj"), _attrs(bfs / "ref")),
                         "dir": (_attrs(run), _attrs(bfs / "ref/run")),
                         "bytes": (run / "out.dat").read_bytes() == b"".join(bytes([r]) * block.size
                                                                             for r in range(size))}
            found = comm.bcast(found)
    finally:
        os.umask(launcher)
    assert found["bytes"]
    assert found["file"][0] == found["file"][1] and found["file"][0][0] == 0o664, found
    assert found["h5"][0] == found["h5"][1] and found["h5"][0][0] == 0o664, found
    assert found["top dir"][0] == found["top dir"][1] and found["top dir"][0][0] == 0o775, found
    assert found["dir"][0] == found["dir"][1] and found["dir"][0][0] == 0o775, found
