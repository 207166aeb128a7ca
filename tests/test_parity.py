"""Parity of ``mpiburst.File`` with ``mpi4py.MPI.File`` in one process (COMM_SELF and COMM_WORLD of 1).

Each test runs one body of ``tests/parity.py`` against both drivers and
compares what they observed and the file bytes (mpiburst's after a sync to
the BFS). ``test_parity_mpi.py`` runs the same bodies on 2 and 4 ranks. The
property tests draw random datatypes and views (hypothesis).

One process is a unit test of the driver: the tier is a memory tier for the
module (``module_mem_tier``), since the driver reaches it only through the
``Store`` interface (whose contract runs on both engines); the same bodies
against a real server, on real ranks, are ``test_parity_mpi.py``.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import parity
from mpiburst import cuda
from mpiburst import datatypes as dtypes
from mpiburst.errors import DeviceBufferError
from mpiburst.file import File

pytestmark = pytest.mark.timeout(120)

COMMS = {"self": MPI.COMM_SELF, "world": MPI.COMM_WORLD}
TYPES = parity.datatypes()
#: Types whose bytes are whole ints (so a view may use MPI.INT as etype).
INT_TYPES = ["named", "contiguous", "vector", "indexed", "hindexed", "indexed_block", "subarray_c",
             "subarray_f", "darray_block", "resized", "resized_lb", "nested"]


@pytest.fixture
def run(module_mem_tier, tmp_path, request):
    """``run(body, comm)``: :func:`parity.check` with a file name unique to the test."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)

    def go(body, comm=MPI.COMM_SELF, suffix=""):
        return parity.check(body, comm, str(tmp_path), module_mem_tier.bfs_root, name + suffix)

    return go


@pytest.mark.parametrize("name", sorted(TYPES))
def test_flattening_matches_pack(name):
    offs, lens = dtypes.runs_of(TYPES[name])
    ref_offs, ref_lens = dtypes.probe(TYPES[name])
    assert offs.tolist() == ref_offs.tolist() and lens.tolist() == ref_lens.tolist()


@pytest.mark.parametrize("comm", sorted(COMMS))
@pytest.mark.parametrize("name", sorted(TYPES))
def test_memory_datatype(run, name, comm):
    counts, _, out = run(parity.memory_type_body(TYPES[name], 3, seed=len(name)), COMMS[comm])
    assert counts == 3 * TYPES[name].Get_size() and any(out)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_filetype_view_bytes(run, name):
    seen = run(parity.view_body(5, MPI.BYTE, TYPES[name], 3 * TYPES[name].Get_size() + 1, seed=3, offset=2))
    assert seen[1] == 3 * TYPES[name].Get_size() + 1


@pytest.mark.parametrize("comm", sorted(COMMS))
@pytest.mark.parametrize("name", INT_TYPES)
def test_filetype_view_ints(run, name, comm):
    nbytes = 2 * TYPES[name].Get_size() + 8
    seen = run(parity.view_body(16, MPI.INT, TYPES[name], nbytes, seed=4, offset=1), COMMS[comm])
    assert seen[2] == nbytes // 4


@pytest.mark.parametrize("comm", sorted(COMMS))
def test_every_access_method(run, comm):
    run(parity.access_body(seed=7), COMMS[comm])


@pytest.mark.parametrize("comm", sorted(COMMS))
def test_shared_pointer_and_ordered(run, comm):
    seen = run(parity.shared_body(seed=9), COMMS[comm])
    assert seen[0] == 2


@pytest.mark.parametrize("kind", sorted(parity.buffer_kinds(0)))
def test_buffer_kind(run, kind):
    counts = run(parity.buffer_body(parity.buffer_kinds(11)[kind]))
    assert counts[0] > 0 and counts[1] == counts[0]


def test_errors(run):
    seen = run(parity.errors_body())
    assert seen[0] == MPI.ERR_ARG and all(e is not None for e in seen)


def test_append_mode_starts_both_pointers_at_the_end(run):
    def body(File, comm, path):
        f = File.Open(comm, path, RW := MPI.MODE_CREATE | MPI.MODE_RDWR)
        f.Write_at(0, b"0123456789")
        f.Close()
        f = File.Open(comm, path, MPI.MODE_RDWR | MPI.MODE_APPEND)
        seen = [f.Get_position(), f.Get_position_shared()]
        f.Write(b"ab")
        f.Write_shared(b"cd")
        f.Close()
        return seen + [RW]

    seen = run(body)
    assert seen[0] == seen[1] > 0


class _Device:
    """A DLPack object on a device (its capsule is never asked for: the device alone decides)."""

    def __init__(self, device_type):
        self.__dlpack_device__ = lambda: (device_type, 0)
        self.__dlpack__ = lambda **kw: None


@pytest.mark.parametrize("device_type,says", [(2, "no CUDA runtime"), (10, "CUDA devices only")])
def test_device_buffers_that_cannot_be_staged_are_refused_clearly(module_mem_tier, monkeypatch, device_type, says):
    monkeypatch.setattr(cuda, "runtime", lambda: None)     # as on a machine without CUDA
    with File.Open(MPI.COMM_SELF, f"burst://dev-{device_type}.dat", MPI.MODE_CREATE | MPI.MODE_RDWR) as f:
        with pytest.raises(DeviceBufferError, match=says) as refused:
            f.Write_at(0, _Device(device_type))
        assert "\n" not in str(refused.value)
        with pytest.raises(TypeError):
            f.Read_at(0, [_Device(device_type), MPI.BYTE])


# -- property tests: random datatypes and views, byte for byte against MPI.File ------------

def _leaf():
    return st.sampled_from([MPI.BYTE, MPI.SHORT, MPI.INT, MPI.DOUBLE])


def _build(draw, depth: int) -> MPI.Datatype:
    """Draw a datatype tree (caller commits and frees the result; inner types are freed here)."""
    if depth == 0 or draw(st.booleans()):
        return draw(_leaf()).Dup()
    base = _build(draw, depth - 1)
    kind = draw(st.sampled_from(["contiguous", "vector", "hvector", "indexed", "hindexed_block", "struct",
                                 "subarray", "resized"]))
    ext = base.Get_extent()[1]
    if kind == "contiguous":
        out = base.Create_contiguous(draw(st.integers(1, 4)))
    elif kind == "vector":
        bl = draw(st.integers(1, 3))
        out = base.Create_vector(draw(st.integers(1, 4)), bl, bl + draw(st.integers(0, 3)))
    elif kind == "hvector":
        bl = draw(st.integers(1, 3))
        out = base.Create_hvector(draw(st.integers(1, 4)), bl, bl * ext + draw(st.integers(0, 9)))
    elif kind == "indexed":
        n = draw(st.integers(1, 4))
        bls = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        gaps = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        disps, at = [], 0
        for b, g in zip(bls, gaps):
            at += g
            disps.append(at)
            at += b
        out = base.Create_indexed(bls, disps)
    elif kind == "hindexed_block":
        n = draw(st.integers(1, 4))
        bl = draw(st.integers(1, 2))
        gaps = draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
        disps, at = [], 0
        for g in gaps:
            at += g
            disps.append(at)
            at += bl * ext
        out = base.Create_hindexed_block(bl, disps)
    elif kind == "struct":
        other = draw(_leaf())
        gap = draw(st.integers(0, 6))
        out = MPI.Datatype.Create_struct([draw(st.integers(1, 2)), 1], [0, 2 * ext + gap], [base, other])
    elif kind == "subarray":
        sizes = [draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3)))]
        subs = [draw(st.integers(1, s)) for s in sizes]
        starts = [draw(st.integers(0, s - b)) for s, b in zip(sizes, subs)]
        order = draw(st.sampled_from([MPI.ORDER_C, MPI.ORDER_FORTRAN]))
        out = base.Create_subarray(sizes, subs, starts, order=order)
    else:
        lb, extent = base.Get_extent()
        out = base.Create_resized(lb, extent + draw(st.integers(0, 12)))
    base.Free()
    return out


_EXAMPLES = itertools.count()


@st.composite
def datatype_trees(draw, depth=3):
    return _build(draw, depth)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dt=datatype_trees(), count=st.integers(1, 3), disp=st.integers(0, 40), seed=st.integers(0, 1000))
def test_property_random_memory_types_and_views(module_mem_tier, tmp_path, dt, count, disp, seed):
    dt.Commit()
    try:
        offs, lens = dtypes.runs_of(dt)
        ref = dtypes.probe(dt)
        assert offs.tolist() == ref[0].tolist() and lens.tolist() == ref[1].tolist()
        if dt.Get_size() == 0:
            return
        name = f"prop-{next(_EXAMPLES)}"
        parity.check(parity.memory_type_body(dt, count, seed), MPI.COMM_SELF, str(tmp_path), module_mem_tier.bfs_root,
                     name + "-mem")
        if not np.all(offs[1:] >= offs[:-1] + lens[:-1]) or offs[0] < 0:
            print("not a filetype", offs.tolist(), lens.tolist())  # overlapping or backwards: no view
            return
        nbytes = count * dt.Get_size()
        parity.check(parity.view_body(disp, MPI.BYTE, dt, nbytes, seed, offset=1), MPI.COMM_SELF, str(tmp_path),
                     module_mem_tier.bfs_root, name + "-view")
    finally:
        dt.Free()


#: MPI.File names mpiburst.File leaves out on purpose (a burst file has no MPI handle; see docs/api.md).
NO_HANDLE = {"Create_errhandler", "handle", "fromhandle", "toint", "fromint", "py2f", "f2py", "free"}


def test_every_mpi_file_method_exists():
    names = {n for n in dir(MPI.File) if not n.startswith("_")}
    missing = sorted(n for n in names - NO_HANDLE if not hasattr(File, n))
    assert missing == []


def test_documented_table_lists_every_method():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")).read()
    names = {n for n in dir(MPI.File) if not n.startswith("_")}
    assert sorted(n for n in names if n not in text) == []


@pytest.mark.parametrize("comm", sorted(COMMS))
def test_atomic_mode(run, comm):
    seen = run(parity.atomic_body(seed=13), COMMS[comm])
    assert seen[0] is True and seen[-1] is False


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ft=datatype_trees(), mt=datatype_trees(), count=st.integers(1, 3), disp=st.integers(0, 17),
       seed=st.integers(0, 1000))
def test_property_memory_type_through_view(module_mem_tier, tmp_path, ft, mt, count, disp, seed):
    ft.Commit()
    mt.Commit()
    try:
        offs, lens = dtypes.layout(ft).offs, dtypes.layout(ft).lens
        usable = ft.Get_size() > 0 and mt.Get_size() > 0 and offs[0] >= 0 and bool(
            np.all(offs[1:] >= offs[:-1] + lens[:-1]))
        if usable:
            parity.check(parity.view_and_memory_body(disp, ft, mt, count, seed), MPI.COMM_SELF, str(tmp_path),
                         module_mem_tier.bfs_root, f"propvm-{next(_EXAMPLES)}")
    finally:
        ft.Free()
        mt.Free()


def test_view_keeps_its_own_datatypes(run):
    def body(File, comm, path):
        ft = MPI.INT.Create_vector(2, 1, 3).Commit()
        f = File.Open(comm, path, MPI.MODE_CREATE | MPI.MODE_RDWR)
        f.Set_view(4, MPI.INT, ft)
        ft.Free()  # allowed right after Set_view
        f.Write_all(np.arange(6, dtype=np.int32))
        disp, etype, filetype, rep = f.Get_view()
        seen = [disp, etype.Get_size(), filetype.Get_extent(), filetype.Get_size(), rep]
        filetype.Free()  # a copy: the view still works
        f.Write_at_all(6, np.arange(2, dtype=np.int32))
        seen.append(f.Get_byte_offset(7))
        f.Close()
        return seen

    assert run(body)[:2] == [4, 4]


def test_large_transfers_map_the_view_in_slices(run, monkeypatch):
    from mpiburst import views

    monkeypatch.setattr(views, "RUNS_PER_CHUNK", 3)  # slices of one tile: every boundary is crossed
    ft = TYPES["indexed"]
    seen = run(parity.view_body(7, MPI.INT, ft, 11 * ft.Get_size(), seed=21, offset=2))
    assert seen[1] == 11 * ft.Get_size()


def test_bottom_with_absolute_addresses(run):
    def body(File, comm, path):
        a, b = parity.ramp(12, 30), parity.ramp(20, 31)
        ra, rb = np.zeros(12, np.uint8), np.zeros(20, np.uint8)
        src = MPI.Datatype.Create_struct([12, 20], [MPI.Get_address(a), MPI.Get_address(b)],
                                         [MPI.BYTE, MPI.BYTE]).Commit()
        dst = MPI.Datatype.Create_struct([12, 20], [MPI.Get_address(ra), MPI.Get_address(rb)],
                                         [MPI.BYTE, MPI.BYTE]).Commit()
        f = File.Open(comm, path, MPI.MODE_CREATE | MPI.MODE_RDWR)
        st = MPI.Status()
        f.Write_at(3, [MPI.BOTTOM, 1, src], st)
        f.Read_at(3, [MPI.BOTTOM, 1, dst])
        f.Close()
        src.Free()
        dst.Free()
        return st.Get_count(MPI.BYTE), ra.tobytes() + rb.tobytes()

    count, back = run(body)
    assert count == 32 and back == parity.ramp(12, 30).tobytes() + parity.ramp(20, 31).tobytes()


def test_requests_mix_with_other_mpi_requests(module_mem_tier):
    """The nonblocking calls return MPI.Request objects: Waitall/Testany take them with any other request."""
    with File.Open(MPI.COMM_SELF, "burst://mixed-requests.dat", MPI.MODE_CREATE | MPI.MODE_RDWR) as f:
        got = bytearray(3)
        reqs = [MPI.COMM_SELF.Irecv(got, source=0, tag=7), f.Iwrite_at(0, b"abcdef"),
                MPI.COMM_SELF.Isend(b"xyz", dest=0, tag=7)]
        statuses = [MPI.Status() for _ in reqs]
        MPI.Request.Waitall(reqs, statuses)
        assert bytes(got) == b"xyz" and statuses[1].Get_count(MPI.BYTE) == 6
        out = bytearray(6)
        req = f.Iread_at(0, out)
        assert MPI.Request.Testany([req])[1] and bytes(out) == b"abcdef"
