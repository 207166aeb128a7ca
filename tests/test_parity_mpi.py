"""Parity of ``mpiburst.File`` with ``mpi4py.MPI.File`` under real ranks (``mpiexec -n 2`` and ``-n 4``).

The bodies of ``tests/parity.py`` run on COMM_WORLD (views that interleave
the ranks' data, darray decompositions, shared and ordered access) and on
COMM_SELF (one file per rank); results and file bytes must match. Plus: an
error inside a collective call reaches every rank.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from mpi4py import MPI

import parity
from mpiburst.errors import MpiburstError
from mpiburst.file import File

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(240)]

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
COMMS = {"self": MPI.COMM_SELF, "world": comm}
MEMORY_TYPES = ["vector", "indexed", "struct", "subarray_c", "darray_cyclic", "resized_lb", "double_int"]


@pytest.fixture
def run(module_tier, request):
    """``run(body, comm)``: :func:`parity.check` with a name unique to the test (and rank, for COMM_SELF)."""
    t = module_tier
    root = os.path.dirname(t.bfs_root)
    base = "".join(c if c.isalnum() else "_" for c in request.node.name)

    def go(body, c):
        name = base if c.Get_size() > 1 else f"{base}_r{rank}"
        return parity.check(body, c, os.path.join(root, "plain"), t.bfs_root, name)

    if rank == 0:
        os.makedirs(os.path.join(root, "plain"), exist_ok=True)
    comm.Barrier()
    return go


@pytest.mark.parametrize("which", sorted(COMMS))
@pytest.mark.parametrize("name", MEMORY_TYPES)
def test_memory_datatype(run, name, which):
    types = parity.datatypes(rank, size)
    try:
        counts, _, out = run(parity.memory_type_body(types[name], 2, seed=len(name)), COMMS[which])
        assert counts == 2 * types[name].Get_size() and any(out)
    finally:
        parity.free_all(types)


@pytest.mark.parametrize("name,etype", [("darray_block", MPI.INT), ("darray_cyclic", MPI.DOUBLE)])
def test_darray_view_decomposition(run, name, etype):
    types = parity.datatypes(rank, size)
    try:
        n = types[name].Get_size()
        seen = run(parity.view_body(12, etype, types[name], n, seed=5, offset=1), comm)
        assert seen[1] == n
    finally:
        parity.free_all(types)


def test_subarray_view_of_a_grid(run):
    rows = 3
    ft = MPI.DOUBLE.Create_subarray([rows * size, 8], [rows, 8], [rows * rank, 0]).Commit()
    try:
        seen = run(parity.view_body(0, MPI.DOUBLE, ft, rows * 8 * 8, seed=6, offset=2), comm)
        assert seen[2] == rows * 8
    finally:
        ft.Free()


def test_interleaved_vector_view(run):
    vec = MPI.INT.Create_vector(3, 2, 2 * size)
    ft = vec.Create_resized(0, 3 * 2 * size * 4).Commit()  # without it the ranks' tiles would overlap
    vec.Free()
    try:
        def body(File, c, path):
            return parity.view_body(8 * rank, MPI.INT, ft, 40, seed=8, offset=1)(File, c, path)

        seen = run(body, comm)
        assert seen[2] == 10
    finally:
        ft.Free()


@pytest.mark.parametrize("which", sorted(COMMS))
def test_every_access_method(run, which):
    run(parity.access_body(seed=7), COMMS[which])


@pytest.mark.parametrize("which", sorted(COMMS))
def test_shared_pointer_and_ordered(run, which):
    seen = run(parity.shared_body(seed=9), COMMS[which])
    assert seen[1] == size * (size + 1) // 2 if which == "world" else seen[1] == 1


@pytest.mark.parametrize("kind", ["bytes", "numpy_2d_fortran", "dlpack", "spec_count_displ",
                                  "cuda_interface_v3_fortran_strides"])
def test_buffer_kind(run, kind):
    counts = run(parity.buffer_body(parity.buffer_kinds(11 + rank)[kind]), comm)
    assert counts[0] == counts[1] > 0


def test_errors(run):
    seen = run(parity.errors_body(), comm)
    assert seen[0] == MPI.ERR_ARG


def test_error_in_a_collective_reaches_every_rank(module_tier):
    with File.Open(comm, "burst://collective-error.dat", MPI.MODE_CREATE | MPI.MODE_RDWR) as f:
        bad = object() if rank == size - 1 else np.zeros(4, np.uint8)
        with pytest.raises(TypeError if rank == size - 1 else MpiburstError, match="expecting buffer|rank"):
            f.Write_at_all(0, bad)
        with pytest.raises(MPI.Exception) as info:
            f.Read_at_all(-1 if rank == 0 else 0, bytearray(4))
        assert info.value.Get_error_class() == MPI.ERR_ARG
        f.Write_at_all(4 * rank, np.full(4, rank, np.uint8))  # the file still works on every rank


def test_atomic_mode_needs_no_sync(run):
    seen = run(parity.atomic_body(seed=13), comm)
    assert seen[0] is True and all(count > 0 for count in seen[1:-1:2])


def test_subarray_writer_example(module_tier):
    """examples/subarray_writer.py: a 2-D decomposition through one subarray view and one Write_all."""
    import importlib.util

    t = module_tier
    if rank == 0:
        os.makedirs(os.path.join(t.bfs_root, "grid"), exist_ok=True)
    comm.Barrier()
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "subarray_writer.py")
    spec = importlib.util.spec_from_file_location("subarray_writer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.write_and_check(comm, 37, 23) is None


def test_concurrent_write_shared_never_overlaps(module_tier):
    """Write_shared from every rank at once: each record lands whole, in a place of its own."""
    n, rec = 40, 24
    with File.Open(comm, "burst://shared-race.dat", MPI.MODE_CREATE | MPI.MODE_RDWR) as f:
        for i in range(n):
            f.Write_shared(np.full(rec, rank * n + i, np.uint8))
        f.Sync()
        comm.Barrier()
        f.Sync()
        assert f.Get_position_shared() == n * size * rec
        data = np.zeros(n * size * rec, np.uint8)
        f.Read_at(0, data)
    records = data.reshape(n * size, rec)
    assert (records == records[:, :1]).all()  # no record torn or overlapped by another
    assert sorted(records[:, 0].tolist()) == list(range(n * size))
