"""Parity cases: one test body, run against ``mpi4py.MPI.File`` and ``mpiburst.File``.

Imported by ``test_parity.py`` (one process: COMM_SELF and a 1-rank
COMM_WORLD) and ``test_parity_mpi.py`` (COMM_WORLD and COMM_SELF at 2 and 4
ranks). A body takes ``(File, comm, path)``, opens the file, does its I/O,
closes it and returns what it observed (read buffers, status counts,
positions, byte offsets, error classes); :func:`check` runs it on both
drivers and compares those results and the file's bytes, read from the BFS
after ``mpiburst.sync`` for mpiburst.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

import mpiburst

RW = MPI.MODE_CREATE | MPI.MODE_RDWR

Body = Callable[[Any, MPI.Comm, str], Any]


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def check(body: Body, comm: MPI.Comm, mpi_dir: str, bfs_root: str, name: str) -> Any:
    """Run ``body`` on ``MPI.File`` and on ``mpiburst.File``; assert equal results and file bytes.

    ``mpi_dir`` is a directory every rank of ``comm`` sees; ``name`` must be
    unique per test (and per rank for COMM_SELF).
    """
    plain = os.path.join(mpi_dir, name)
    burst = f"burst://{name}"
    bfs_file = os.path.join(os.path.realpath(bfs_root), name)
    # MPI leaves the bytes of a view's holes undefined (ROMIO's data sieving writes garbage there in
    # a new file): both drivers start from the same file of the final size, so every byte is defined.
    body(MPI.File, comm, plain + ".probe")
    comm.Barrier()
    if comm.Get_rank() == 0:
        size = os.path.getsize(plain + ".probe")
        os.remove(plain + ".probe")
        for target in (plain, bfs_file):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(ramp(size, 12345).tobytes())
    comm.Barrier()
    expected = body(MPI.File, comm, plain)
    got = body(mpiburst.File, comm, burst)
    assert got == expected, f"{name}: mpiburst {got!r} != MPI.File {expected!r}"
    mpiburst.sync(burst, comm=comm if comm.Get_size() > 1 else None)
    comm.Barrier()
    ours = file_bytes(bfs_file)
    theirs = file_bytes(plain)
    assert ours == theirs, f"{name}: file bytes differ ({len(ours)} vs {len(theirs)} bytes, " \
                           f"first difference at {_first_diff(ours, theirs)})"
    return got


def _first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    x = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
    return int(np.argmax(x)) if x.any() else n


def error_class(fn: Callable[[], Any]) -> int | str | None:
    """Return the MPI error class ``fn`` raises, the name of another exception type, or None."""
    try:
        fn()
    except MPI.Exception as exc:
        return exc.Get_error_class()
    except Exception as exc:  # noqa: BLE001 - the type is the observation
        return type(exc).__name__
    return None


def ramp(n: int, seed: int) -> np.ndarray:
    """``n`` reproducible bytes, different per seed."""
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8)


# -- datatypes ------------------------------------------------------------------

def datatypes(rank: int = 0, size: int = 1) -> dict[str, MPI.Datatype]:
    """One committed datatype per constructor (and a few combinations), named."""
    i, d = MPI.INT, MPI.DOUBLE
    vec = i.Create_vector(3, 2, 4)
    types = {
        "named": i.Dup(),
        "double_int": MPI.DOUBLE_INT.Dup(),
        "contiguous": i.Create_contiguous(5),
        "vector": vec.Dup(),
        "hvector": MPI.SHORT.Create_hvector(3, 2, 11),
        "indexed": i.Create_indexed([2, 1, 3], [0, 4, 7]),
        "hindexed": i.Create_hindexed([1, 2], [3, 20]),
        "indexed_block": i.Create_indexed_block(2, [1, 5, 9]),
        "hindexed_block": d.Create_hindexed_block(1, [0, 24, 40]),
        "struct": MPI.Datatype.Create_struct([1, 2, 1], [0, 8, 28], [i, d, MPI.CHAR]),
        "subarray_c": i.Create_subarray([4, 6], [2, 3], [1, 2]),
        "subarray_f": i.Create_subarray([4, 6], [3, 2], [1, 3], order=MPI.ORDER_FORTRAN),
        "darray_block": i.Create_darray(size, rank, [8, 6], [MPI.DISTRIBUTE_BLOCK, MPI.DISTRIBUTE_BLOCK],
                                        [MPI.DISTRIBUTE_DFLT_DARG] * 2, [size, 1]),
        "darray_cyclic": d.Create_darray(size, rank, [7, 5], [MPI.DISTRIBUTE_CYCLIC, MPI.DISTRIBUTE_NONE],
                                         [2, MPI.DISTRIBUTE_DFLT_DARG], [size, 1], order=MPI.ORDER_FORTRAN),
        "resized": i.Create_resized(0, 12),
        "resized_lb": vec.Create_resized(-8, 64),
        "vector_of_struct": MPI.Datatype.Create_struct([1, 1], [0, 5], [i, MPI.CHAR]).Create_vector(2, 1, 3),
        "nested": vec.Create_hvector(2, 1, 100),
    }
    vec.Free()
    for t in types.values():
        t.Commit()
    return types


def free_all(types: dict[str, MPI.Datatype]) -> None:
    for t in types.values():
        t.Free()


def memory_extent(dt: MPI.Datatype, count: int) -> tuple[int, int]:
    """Return (bytes of buffer needed, byte where instance 0 starts) for ``count`` instances of ``dt``."""
    lb, extent = dt.Get_extent()
    tlb, text = dt.Get_true_extent()
    lo = min(tlb, tlb + (count - 1) * extent)
    hi = max(tlb + text, tlb + text + (count - 1) * extent)
    origin = max(0, -lo)
    return origin + hi, origin


# -- bodies ---------------------------------------------------------------------

def memory_type_body(dt: MPI.Datatype, count: int, seed: int) -> Body:
    """Write ``count`` of ``dt`` from memory at a per-rank offset, then read them back into ``dt``."""

    def body(File, comm, path):
        rank = comm.Get_rank()
        nbytes, origin = memory_extent(dt, count)
        src = ramp(nbytes + origin + 8, seed + rank)
        at = sum(comm.allgather(dt.Get_size() * count)[:rank])  # ranks' parts side by side (sizes may differ)
        # origin shifts the buffer so negative lower bounds stay inside it: [buf, (count, displ), dt]
        # takes whole extents only, so the shift is a memoryview slice
        f = File.Open(comm, path, RW)
        st = MPI.Status()
        f.Write_at_all(at, [memoryview(src)[origin:], count, dt], st)
        out = np.zeros_like(src)
        f.Sync()
        comm.Barrier()
        f.Sync()
        st2 = MPI.Status()
        f.Read_at_all(at, [memoryview(out)[origin:], count, dt], st2)
        f.Close()
        return st.Get_count(MPI.BYTE), st2.Get_count(MPI.BYTE), out.tobytes()

    return body


def view_body(disp: int, etype: MPI.Datatype, filetype: MPI.Datatype, nbytes: int, seed: int,
              offset: int = 0) -> Body:
    """Set a view, Write_all at the pointer, Write_at_all at ``offset``, read both back; report positions."""

    def body(File, comm, path):
        rank = comm.Get_rank()
        data = ramp(nbytes, seed + rank)
        f = File.Open(comm, path, RW)
        f.Set_view(disp, etype, filetype)
        seen: list[Any] = [f.Get_type_extent(filetype)]
        st = MPI.Status()
        f.Write_all(data, st)
        seen += [st.Get_count(MPI.BYTE), f.Get_position()]
        seen += [f.Get_byte_offset(k) for k in range(0, 3 * (nbytes // etype.Get_size()) + 1, 3)]
        f.Write_at_all(offset, data[::-1].copy())
        f.Sync()
        comm.Barrier()
        f.Sync()
        back = np.zeros(nbytes, np.uint8)
        f.Read_at_all(0, back, st)
        seen += [st.Get_count(MPI.BYTE), back.tobytes()]
        f.Seek(1, MPI.SEEK_SET)
        f.Read_all(back, st)
        seen += [f.Get_position(), back.tobytes()]
        f.Seek(0, MPI.SEEK_END)
        seen.append(f.Get_position())
        f.Close()
        return seen

    return body


def access_body(seed: int) -> Body:
    """Every access method once, under a per-rank vector view; report counts, positions and reads."""

    def body(File, comm, path):
        rank, size = comm.Get_rank(), comm.Get_size()
        vec = MPI.INT.Create_vector(4, 2, 2 * size)  # 2 ints of this rank, then the others'
        ft = vec.Create_resized(0, 4 * 2 * size * 4).Commit()  # a tile spans every rank's blocks
        vec.Free()
        seen: list[Any] = []
        f = File.Open(comm, path, RW)
        f.Set_view(8 * rank, MPI.INT, ft)
        data = [ramp(8 * k, seed + 10 * rank + k) for k in range(1, 12)]
        st = MPI.Status()
        f.Write_at(0, data[0], st)
        seen.append(st.Get_count(MPI.BYTE))
        f.Write_at_all(2, data[1])
        f.Seek(4)
        f.Write(data[2])
        f.Write_all(data[3])
        # pending nonblocking writes must not overlap (MPI leaves their order open)
        reqs = [f.Iwrite_at(60, data[4]), f.Iwrite_at_all(80, data[5]), f.Iwrite(data[6]), f.Iwrite_all(data[7])]
        statuses = [MPI.Status() for _ in reqs]
        MPI.Request.Waitall(reqs, statuses)
        seen += [s.Get_count(MPI.BYTE) for s in statuses]
        f.Write_at_all_begin(40, data[8])
        f.Write_at_all_end(data[8], st)
        seen.append(st.Get_count(MPI.BYTE))
        f.Write_all_begin(data[9])
        f.Write_all_end(data[9], st)
        seen += [st.Get_count(MPI.BYTE), f.Get_position()]
        f.Sync()
        comm.Barrier()
        f.Sync()
        outs = [np.zeros(8 * k, np.uint8) for k in range(1, 9)]
        f.Read_at(0, outs[0], st)
        f.Read_at_all(2, outs[1])
        f.Seek(4)
        f.Read(outs[2])
        f.Read_all(outs[3])
        reqs = [f.Iread_at(20, outs[4]), f.Iread_at_all(22, outs[5]), f.Iread(outs[6]), f.Iread_all(outs[7])]
        for r in reqs:
            r.Wait(st)
            seen.append(st.Get_count(MPI.BYTE))
        seen.append(f.Get_position())
        more = np.zeros(16, np.uint8)
        f.Read_at_all_begin(40, more)
        f.Read_at_all_end(more, st)
        seen += [st.Get_count(MPI.BYTE), more.tobytes()]
        f.Seek(2)
        f.Read_all_begin(more)
        f.Read_all_end(more, st)
        seen += [st.Get_count(MPI.BYTE), more.tobytes(), f.Get_position()]
        seen += [o.tobytes() for o in outs]
        f.Close()
        ft.Free()
        return seen

    return body


def shared_body(seed: int) -> Body:
    """Shared pointer and ordered access (rank-ordered: deterministic on any number of ranks)."""

    def body(File, comm, path):
        rank, size = comm.Get_rank(), comm.Get_size()
        seen: list[Any] = []
        f = File.Open(comm, path, RW)
        f.Set_view(4, MPI.SHORT, MPI.SHORT)
        st = MPI.Status()
        f.Write_ordered(ramp(2 * (rank + 1), seed + rank), st)
        seen += [st.Get_count(MPI.BYTE), f.Get_position_shared(), f.Get_position()]
        comm.Barrier()  # every rank has read the pointer before any moves it
        for turn in range(size):  # one rank at a time: the shared pointer's order is then fixed
            if turn == rank:
                f.Write_shared(ramp(6, seed + 50 + rank))
                req = f.Iwrite_shared(ramp(4, seed + 60 + rank))
                req.Wait()
            comm.Barrier()
        seen.append(f.Get_position_shared())
        comm.Barrier()
        last = ramp(2 * (size - rank), seed + 70 + rank)
        f.Write_ordered_begin(last)
        f.Write_ordered_end(last, st)
        seen += [st.Get_count(MPI.BYTE), f.Get_position_shared()]
        comm.Barrier()
        f.Seek_shared(3)
        seen.append(f.Get_position_shared())
        comm.Barrier()
        f.Seek_shared(2, MPI.SEEK_CUR)
        seen.append(f.Get_position_shared())
        f.Sync()
        comm.Barrier()
        f.Sync()
        f.Seek_shared(0)
        out = np.zeros(2 * (rank + 2), np.uint8)
        f.Read_ordered(out, st)
        seen += [st.Get_count(MPI.BYTE), out.tobytes(), f.Get_position_shared()]
        comm.Barrier()
        for turn in range(size):
            if turn == rank:
                f.Read_shared(out, st)
                seen += [st.Get_count(MPI.BYTE), out.tobytes()]
                req = f.Iread_shared(out)
                req.Wait(st)
                seen += [st.Get_count(MPI.BYTE), out.tobytes()]
            comm.Barrier()
        f.Read_ordered_begin(out)
        f.Read_ordered_end(out, st)
        seen += [st.Get_count(MPI.BYTE), out.tobytes()]
        f.Seek_shared(0, MPI.SEEK_END)
        seen.append(f.Get_position_shared())
        f.Close()
        return seen

    return body


class ArrayInterfaceOnly:
    """A host array exposing only ``__array_interface__`` (no buffer protocol)."""

    def __init__(self, arr: np.ndarray):
        self._arr = arr
        self.__array_interface__ = arr.__array_interface__


class DLPackOnly:
    """A host array exposing only DLPack (no buffer protocol)."""

    def __init__(self, arr: np.ndarray):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


class CudaInterfaceOnly:
    """Host memory behind ``__cuda_array_interface__`` alone, as mpi4py's ``FakeGPUArray*`` test arrays.

    Without a CUDA device such a pointer is host memory to both drivers. ``strides``
    publishes the array's strides (version 2+ may, version 0 may not), ``version`` 3
    adds a ``stream`` of None; ``mask`` and ``readonly`` go into the interface as given.
    """

    def __init__(self, arr: np.ndarray, version: int = 3, strides: bool = False, readonly: bool = False,
                 mask: Any = None):
        self._arr = arr
        cai: dict[str, Any] = {"shape": arr.shape, "typestr": arr.dtype.str, "data": (arr.ctypes.data, readonly),
                               "version": version}
        if strides:
            cai["strides"] = arr.strides
        if version >= 3:
            cai["stream"] = None
        if mask is not None:
            cai["mask"] = mask
        self.__cuda_array_interface__ = cai


def buffer_kinds(seed: int) -> dict[str, Callable[[], tuple[Any, Any]]]:
    """Named makers of (write buffer, read buffer factory result) pairs, every kind mpi4py takes."""
    a = ramp(48, seed)
    ints = a.view(np.int32)
    return {
        "bytes": lambda: (a.tobytes(), bytearray(48)),
        "bytearray": lambda: (bytearray(a.tobytes()), bytearray(48)),
        "memoryview": lambda: (memoryview(a.tobytes()), memoryview(bytearray(48))),
        "numpy_int32": lambda: (ints.copy(), np.zeros(12, np.int32)),
        "numpy_2d_fortran": lambda: (np.asfortranarray(ints.reshape(3, 4)), np.zeros((3, 4), np.int32, order="F")),
        "array_interface": lambda: (ArrayInterfaceOnly(ints.copy()), ArrayInterfaceOnly(np.zeros(12, np.int32))),
        "dlpack": lambda: (DLPackOnly(ints.copy()), DLPackOnly(np.zeros(12, np.int32))),
        "cuda_interface_v0": lambda: (CudaInterfaceOnly(ints.copy(), version=0),
                                      CudaInterfaceOnly(np.zeros(12, np.int32), version=0)),
        "cuda_interface_v3_fortran_strides": lambda: (
            CudaInterfaceOnly(np.asfortranarray(ints.reshape(3, 4)), strides=True),
            CudaInterfaceOnly(np.zeros((3, 4), np.int32, order="F"), strides=True)),
        "cuda_interface_spec": lambda: ([CudaInterfaceOnly(ints.copy(), version=2), 4, 2, MPI.INT],
                                        [CudaInterfaceOnly(np.zeros(12, np.int32), version=1), 4, 2, MPI.INT]),
        "spec_dtype": lambda: ([ints.copy(), MPI.INT], [np.zeros(12, np.int32), MPI.INT]),
        "spec_count": lambda: ([ints.copy(), 5, MPI.INT], [np.zeros(12, np.int32), 5, MPI.INT]),
        "spec_count_displ": lambda: ([ints.copy(), (4, 3), MPI.INT], [np.zeros(12, np.int32), (4, 3), MPI.INT]),
        "spec_4_items": lambda: ([ints.copy(), 4, 2, MPI.INT], [np.zeros(12, np.int32), 4, 2, MPI.INT]),
        "spec_typecode": lambda: ([ints.copy(), "i"], [np.zeros(12, np.int32), "i"]),
    }


def buffer_body(make: Callable[[], tuple[Any, Any]]) -> Body:
    def body(File, comm, path):
        rank = comm.Get_rank()
        src, dst = make()
        if File is MPI.File and isinstance(src, ArrayInterfaceOnly):
            src, dst = src._arr, dst  # mpi4py 4.1 refuses __array_interface__ alone; mpiburst takes it
            dst = dst._arr
        f = File.Open(comm, path, RW)
        st = MPI.Status()
        f.Write_at_all(48 * rank, src, st)
        f.Sync()
        comm.Barrier()
        f.Sync()
        st2 = MPI.Status()
        f.Read_at_all(48 * rank, dst, st2)
        f.Close()
        target = dst[0] if isinstance(dst, list) else dst
        target = getattr(target, "_arr", target)
        return st.Get_count(MPI.BYTE), st2.Get_count(MPI.BYTE), bytes(np.asarray(target).tobytes(order="A"))

    return body


def errors_body() -> Body:
    """Misuse that MPI.File refuses, with the error class (or exception type) it raises."""

    def body(File, comm, path):
        seen: list[Any] = []
        f = File.Open(comm, path, RW)
        vec = MPI.INT.Create_vector(2, 1, 3).Commit()
        back = MPI.INT.Create_indexed([1, 1], [3, 0]).Commit()
        seen.append(error_class(lambda: f.Set_view(0, MPI.INT, MPI.SHORT)))
        seen.append(error_class(lambda: f.Set_view(-1, MPI.INT, MPI.INT)))
        seen.append(error_class(lambda: f.Set_view(0, MPI.INT, back)))
        seen.append(error_class(lambda: f.Set_view(0, MPI.INT, MPI.INT, "no-such-rep")))
        seen.append(error_class(lambda: f.Seek(-1)))
        seen.append(error_class(lambda: f.Seek(0, 12345)))
        seen.append(error_class(lambda: f.Write_at(-1, b"x")))
        if comm.Get_size() == 1:  # MPICH raises this on rank 0 only and the other ranks hang
            seen.append(error_class(lambda: f.Seek_shared(-1)))
        f.Set_view(0, MPI.INT, vec)
        seen.append(error_class(lambda: f.Write_at(0, b"abc")))
        seen.append(error_class(lambda: f.Write_all_end(b"abcd")))
        f.Write_all_begin(b"abcd")
        seen.append(error_class(lambda: f.Write_all_begin(b"abcd")))
        seen.append(error_class(lambda: f.Read_at_all_begin(0, bytearray(4))))
        f.Write_all_end(b"abcd")
        seen.append(error_class(lambda: f.Read_at(0, b"immutable")))
        seen.append(error_class(lambda: f.Write_at(0, [np.zeros(3, np.int32), MPI.DOUBLE])))
        seen.append(error_class(lambda: f.Write_at(0, [np.zeros(4, np.int32), (1, 9), MPI.INT])))
        seen.append(error_class(lambda: f.Write_at(0, object())))
        grid = np.zeros((4, 4), np.int32)
        seen.append(error_class(lambda: f.Write_at(0, CudaInterfaceOnly(grid[:, ::2], strides=True))))
        seen.append(error_class(lambda: f.Read_at(0, CudaInterfaceOnly(grid, readonly=True))))
        seen.append(error_class(lambda: f.Write_at(0, CudaInterfaceOnly(grid, mask=grid))))
        f.Close()
        seen.append(error_class(lambda: f.Write_at(0, b"abcd")))
        vec.Free()
        back.Free()
        ro = File.Open(comm, path, MPI.MODE_RDONLY)
        seen.append(error_class(lambda: ro.Write_at(0, b"abcd")))
        ro.Close()
        return seen

    return body


def atomic_body(seed: int) -> Body:
    """Atomic mode: a write is visible to the other ranks after a barrier alone (no Sync)."""

    def body(File, comm, path):
        rank, size = comm.Get_rank(), comm.Get_size()
        f = File.Open(comm, path, RW)
        f.Set_atomicity(True)
        seen: list[Any] = [f.Get_atomicity()]
        for turn in range(size):
            if turn == rank:
                f.Write_at(4 * turn, ramp(12, seed + turn))  # overlaps the previous rank's write
            comm.Barrier()
            out = bytearray(4 * size + 8)
            st = MPI.Status()
            f.Read_at(0, out, st)
            seen += [st.Get_count(MPI.BYTE), bytes(out)]
            comm.Barrier()
        f.Set_atomicity(False)
        seen.append(f.Get_atomicity())
        f.Close()
        return seen

    return body


def view_and_memory_body(disp: int, filetype: MPI.Datatype, memtype: MPI.Datatype, count: int, seed: int) -> Body:
    """A noncontiguous memory datatype written through, and read back through, a noncontiguous view."""

    def body(File, comm, path):
        nbytes, origin = memory_extent(memtype, count)
        src = ramp(nbytes + origin, seed)
        f = File.Open(comm, path, RW)
        f.Set_view(disp, MPI.BYTE, filetype)
        st = MPI.Status()
        f.Write_all([memoryview(src)[origin:], count, memtype], st)
        seen: list[Any] = [st.Get_count(MPI.BYTE), f.Get_position()]
        out = np.zeros_like(src)
        f.Read_at_all(0, [memoryview(out)[origin:], count, memtype], st)
        seen += [st.Get_count(MPI.BYTE), out.tobytes()]
        f.Close()
        return seen

    return body
