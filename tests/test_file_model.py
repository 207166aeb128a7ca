"""Property test of the MPI-IO driver: random operation sequences against a bytearray model.

Hypothesis generates sequences of writes (overlapping, unaligned, some above
the 256 KiB fragment size and the write-back buffer), ``Set_size``
truncations and extensions, ``Sync``, close-and-reopen, and reads; each read
and ``Get_size`` is compared with a plain ``bytearray`` image of the file. The
file may start with BFS bytes. One real server serves every example (a new
file per example).
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import mpiburst
from mpiburst import File
from mpiburst.tier import Tier

RW = MPI.MODE_CREATE | MPI.MODE_RDWR
_names = itertools.count()

offsets = st.integers(0, 400_000)
ops = st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 300_000), st.integers(0, 255)),
    st.tuples(st.just("write"), st.integers(0, 2000), st.integers(1, 200), st.integers(0, 255)),
    st.tuples(st.just("set_size"), st.integers(0, 500_000)),
    st.tuples(st.just("read"), st.integers(0, 600_000), st.integers(1, 300_000)),
    st.tuples(st.just("sync")),
    st.tuples(st.just("reopen")),
)
#: The same operations plus a flush to the BFS followed by dropping the clean tier copy.
ops_with_flush = st.one_of(ops, st.tuples(st.just("flush")))


@pytest.fixture(scope="module")
def model_tier(tmp_path_factory, server_binary):
    """One real server for the whole module (hypothesis runs many examples)."""
    root = tmp_path_factory.mktemp("model")
    (root / "bfs").mkdir()
    t = Tier.start(id=f"model{os.getpid()}", dir=str(root), bfs_root=str(root / "bfs"), capacity="512M",
                   server=server_binary)
    yield t
    t.stop()


def fill(n: int, seed: int) -> bytes:
    """``n`` bytes that differ from write to write (a counter pattern offset by ``seed``)."""
    return bytes((seed + i * 7) % 251 for i in range(min(n, 251))) * (n // 251 + 1)


@pytest.mark.timeout(600)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=st.integers(0, 50_000), buffer=st.sampled_from(["4K", "64K", "1M"]),
       sequence=st.lists(ops, min_size=1, max_size=25))
def test_driver_matches_bytearray_model(model_tier, initial, buffer, sequence):
    run_model(model_tier, initial, buffer, sequence)


@pytest.mark.timeout(600)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=st.integers(0, 50_000), buffer=st.sampled_from(["4K", "64K", "1M"]),
       sequence=st.lists(ops_with_flush, min_size=1, max_size=25))
def test_driver_with_flushes_matches_bytearray_model(model_tier, initial, buffer, sequence):
    """Reads mix tier fragments, flushed BFS bytes and truncations; the model must still hold."""
    run_model(model_tier, initial, buffer, sequence)


def run_model(model_tier, initial: int, buffer: str, sequence: list) -> None:
    """Apply ``sequence`` to a new file through the driver and to a bytearray; compare at every step."""
    name = f"m{next(_names)}.dat"
    bfs = os.path.join(os.path.realpath(model_tier.bfs_root), name)
    model = bytearray(fill(initial, 99)[:initial])
    if initial:
        with open(bfs, "wb") as fh:
            fh.write(model)
    info = MPI.Info.Create()
    info.Set("mpiburst_wr_buffer", buffer)
    f = File.Open(MPI.COMM_SELF, f"burst://{name}", RW, info)
    try:
        for op in sequence:
            kind = op[0]
            if kind == "write":
                _, off, n, seed = op
                data = fill(n, seed)[:n]
                f.Write_at(off, data)
                if off + n > len(model):
                    model.extend(bytes(off + n - len(model)))
                model[off:off + n] = data
            elif kind == "set_size":
                f.Set_size(op[1])
                del model[op[1]:]
                model.extend(bytes(op[1] - len(model)))
            elif kind == "read":
                _, off, n = op
                buf = bytearray(n)
                status = MPI.Status()
                f.Read_at(off, buf, status)
                count = status.Get_count(MPI.BYTE)
                assert count == max(0, min(n, len(model) - off))
                assert bytes(buf[:count]) == bytes(model[off:off + count])
            elif kind == "sync":
                f.Sync()
            elif kind == "flush":
                f.Sync()
                mpiburst.sync(f"burst://{name}", tier=model_tier)
                with open(bfs, "rb") as fh:
                    assert fh.read() == bytes(model)
                mpiburst.purge(f"burst://{name}", clean_only=True, tier=model_tier)
            else:
                f.Close()
                f = File.Open(MPI.COMM_SELF, f"burst://{name}", MPI.MODE_RDWR, info)
            assert f.Get_size() == len(model)
        whole = bytearray(len(model))
        f.Read_at(0, whole)
        assert whole == model
    finally:
        f.Close()
        info.Free()
        File.Delete(f"burst://{name}")
