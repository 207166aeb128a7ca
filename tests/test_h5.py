"""mpiburst.h5: h5py files through the tier, from one process (real h5py, real h5dump).

Unit tests on the memory store (``mem_tier``); a real server where the
server is what is checked: a file left open at interpreter exit (a second
process joins the run) and connections given back (the server's client list).

The parallel helper's multi-rank tests are in ``test_h5_mpi.py``; here it runs
on ``COMM_SELF`` and its refusals and byte arithmetic are checked.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import h5py
import numpy as np
import pytest

import mpiburst
from mpiburst import h5 as mh5

from conftest import REPO, cli_env, require_tool

pytestmark = pytest.mark.timeout(120)

COMPOUND = np.dtype([("id", "<i8"), ("x", "<f4"), ("tag", "S4")])


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    rec = np.zeros(5, COMPOUND)
    rec["id"], rec["x"], rec["tag"] = np.arange(5), rng.random(5), [b"a", b"bb", b"ccc", b"dddd", b""]
    return {
        "ints/i1": np.arange(-50, 50, dtype="i1"),
        "ints/u2": np.arange(1000, dtype="<u2").reshape(10, 100),
        "ints/i8be": np.arange(12, dtype=">i8").reshape(3, 4),
        "floats/f4": rng.random((33, 17), dtype="f4"),
        "floats/f8": rng.random((4, 5, 6)),
        "c16": (rng.random(9) + 1j * rng.random(9)),
        "flags": rng.random(20) > 0.5,
        "names": np.array([b"alpha", b"beta", b"gamma"], dtype="S8"),
        "records": rec,
        "scalar": np.array(3.25),
    }


def _write_sample(name: str, tier) -> dict[str, np.ndarray]:
    data = _arrays()
    with mh5.File(name, "w", tier=tier) as f:
        for path, arr in data.items():
            f.create_dataset(path, data=arr)
        f.attrs["title"] = "sample run"
        f["ints"].attrs["count"] = np.int32(3)
        f["floats/f8"].attrs["units"] = "m/s"
        f["floats/f8"].attrs["origin"] = np.array([0.5, 1.5, 2.5])
        f.create_group("empty/nested")
    return data


def _check_sample(f: h5py.File, data: dict[str, np.ndarray]) -> None:
    for path, arr in data.items():
        got = f[path][()]
        assert f[path].dtype == arr.dtype, path
        np.testing.assert_array_equal(got, arr, err_msg=path)
    assert f.attrs["title"] == "sample run"
    assert f["ints"].attrs["count"] == 3
    assert f["floats/f8"].attrs["units"] == "m/s"
    np.testing.assert_array_equal(f["floats/f8"].attrs["origin"], [0.5, 1.5, 2.5])
    assert isinstance(f["empty/nested"], h5py.Group)


def _h5dump(h5dump: str, path: str) -> str:
    done = subprocess.run([h5dump, path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "error" not in done.stdout.lower()
    return done.stdout


def test_serial_write_read_before_and_after_flush(mem_tier):
    h5dump = require_tool("h5dump")
    data = _write_sample("burst://out/sample.h5", mem_tier)
    bfs_path = os.path.join(mem_tier.bfs_root, "out", "sample.h5")
    assert not os.path.exists(bfs_path)  # only in the tier: the reads below come from it

    with mh5.File("burst://out/sample.h5", "r", tier=mem_tier) as f:
        assert f.filename == "burst://out/sample.h5" and f.burst_path == bfs_path
        _check_sample(f, data)

    os.makedirs(os.path.dirname(bfs_path))
    report = mpiburst.sync("burst://out/sample.h5", tier=mem_tier)
    assert report.size == os.path.getsize(bfs_path)
    with h5py.File(bfs_path, "r") as f:  # plain h5py on the BFS file
        _check_sample(f, data)
    text = _h5dump(h5dump, bfs_path)
    assert 'DATASET "f8"' in text and '"sample run"' in text and 'GROUP "nested"' in text


def test_reads_see_the_newest_data(mem_tier):
    h5dump = require_tool("h5dump")
    with mh5.File("burst://new.h5", "w", tier=mem_tier) as f:
        f["u"] = np.zeros(1000)
        f.attrs["step"] = 0
    mpiburst.sync("burst://new.h5", tier=mem_tier)
    with mh5.File("burst://new.h5", "a", tier=mem_tier) as f:  # existing file: opened r+
        f["u"][10:20] = 7.0
        f.attrs["step"] = 1
        f["v"] = np.arange(3)
    with mh5.File("burst://new.h5", "r", tier=mem_tier) as f:  # tier data over the flushed file
        assert f.attrs["step"] == 1 and f["u"][15] == 7.0 and f["u"][25] == 0.0
        np.testing.assert_array_equal(f["v"][()], [0, 1, 2])
    with h5py.File(os.path.join(mem_tier.bfs_root, "new.h5"), "r") as f:  # the BFS still has the old one
        assert f.attrs["step"] == 0 and "v" not in f
    mpiburst.sync("burst://new.h5", tier=mem_tier)
    with h5py.File(os.path.join(mem_tier.bfs_root, "new.h5"), "r") as f:
        assert f.attrs["step"] == 1 and f["u"][15] == 7.0
    _h5dump(h5dump, os.path.join(mem_tier.bfs_root, "new.h5"))


def test_modes_and_bad_arguments(mem_tier):
    with pytest.raises(FileNotFoundError):
        mh5.File("burst://none.h5", "r", tier=mem_tier)
    with mh5.File("burst://m.h5", "x", tier=mem_tier) as f:
        f["a"] = [1, 2]
    with pytest.raises(FileExistsError):
        mh5.File("burst://m.h5", "w-", tier=mem_tier)
    with mh5.File("burst://m.h5", "w", tier=mem_tier) as f:  # truncates
        assert list(f) == []
    with pytest.raises(ValueError, match="invalid mode"):
        mh5.File("burst://m.h5", "rw", tier=mem_tier)
    with pytest.raises(ValueError, match="chooses the HDF5 driver"):
        mh5.File("burst://m.h5", "r", tier=mem_tier, driver="core")


def test_close_order_on_exception_and_garbage_collection(mem_tier):
    with pytest.raises(RuntimeError, match="boom"):
        with mh5.File("burst://exc.h5", "w", tier=mem_tier) as f:
            f["x"] = np.arange(10)
            raise RuntimeError("boom")
    assert not f.id.valid and f._burst is None
    with mh5.File("burst://exc.h5", "r", tier=mem_tier) as f:
        np.testing.assert_array_equal(f["x"][()], np.arange(10))

    f = mh5.File("burst://gc.h5", "w", tier=mem_tier)
    dset = f.create_dataset("y", data=np.arange(5.0))
    fobj = weakref.ref(f._burst)
    del f
    gc.collect()
    assert not fobj().closed and dset[3] == 3.0  # HDF5 keeps the file (and its file object) open
    del dset
    gc.collect()
    assert fobj() is None  # HDF5 closed the file, then released the file object, whose close pushed its data
    with mh5.File("burst://gc.h5", "r", tier=mem_tier) as f:
        np.testing.assert_array_equal(f["y"][()], np.arange(5.0))


def test_file_left_open_at_interpreter_exit_is_saved(tier):
    conf = os.path.join(tier.conf.dir, f"mpiburst_{tier.id}.conf")
    script = ("import numpy as np, mpiburst.h5 as mh5\n"
              "f = mh5.File('burst://exit.h5', 'w')\n"
              "f['z'] = np.arange(100)\n"
              "f.attrs['done'] = 'yes'\n")
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(MPIBURST_CONF=conf), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    with mh5.File("burst://exit.h5", "r", tier=tier) as f:
        assert f.attrs["done"] == "yes"
        np.testing.assert_array_equal(f["z"][()], np.arange(100))


def test_missing_h5py_is_named():
    script = ("import sys; sys.modules['h5py'] = None\n"
              "try:\n    import mpiburst.h5\n"
              "except ImportError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True,
                          timeout=60, cwd=str(REPO))
    assert "pip install mpiburst[h5py]" in done.stdout, done.stdout + done.stderr


def test_parallel_helper_on_one_rank(mem_tier):
    from mpi4py import MPI

    u = np.arange(60, dtype="f8").reshape(6, 10)
    with mh5.parallel_create("burst://p1.h5", MPI.COMM_SELF, {"grp/u": (u.shape, u.dtype)},
                             attrs={"/": {"code": "demo"}, "grp/u": {"units": "K"}}) as pf:
        off = pf.datasets["grp/u"].offset
        assert off % mem_tier.align == 0 or u.nbytes < mem_tier.align
        pf.write("grp/u", np.s_[:3], u[:3])
        pf.write("grp/u", np.s_[3:, :4], u[3:, :4])
        pf.write("grp/u", (slice(3, None), slice(4, None)), u[3:, 4:])
    with mh5.File("burst://p1.h5", "r", tier=mem_tier) as f:
        np.testing.assert_array_equal(f["grp/u"][()], u)
        assert f.attrs["code"] == "demo" and f["grp/u"].attrs["units"] == "K"


def test_parallel_helper_refuses_a_write_after_close_in_one_sentence(mem_tier):
    from mpi4py import MPI

    pf = mh5.parallel_create("burst://shut.h5", MPI.COMM_SELF, {"d": ((4,), "f8")})
    pf.close()
    with pytest.raises(ValueError, match=r"closed; create it again with parallel_create"):
        pf.write("d", ..., np.zeros(4))


def test_parallel_helper_aligns_large_datasets(mem_tier):
    from mpi4py import MPI

    shape = (mem_tier.align // 8 + 5,)  # just over one alignment unit
    with mh5.parallel_create("burst://big.h5", MPI.COMM_SELF,
                             {"a": (shape, "f8"), "b": (shape, "f4"), "c": (shape, "f8")}) as pf:
        assert pf.datasets["a"].offset % mem_tier.align == 0
        assert pf.datasets["b"].offset % mem_tier.align != 0  # below the threshold: packed
        assert pf.datasets["c"].offset % mem_tier.align == 0
        pf.write("a", ..., np.arange(shape[0], dtype="f8"))
    with mh5.File("burst://big.h5", "r", tier=mem_tier) as f:
        assert f["a"][-1] == shape[0] - 1 and f["a"].chunks is None


@pytest.mark.parametrize("spec, what", [
    ({"shape": (10,), "dtype": "f4", "chunks": (5,)}, "chunked datasets"),
    ({"shape": (10,), "dtype": "f4", "compression": "gzip"}, "compressed datasets"),
    ({"shape": (10,), "dtype": "f4", "maxshape": (None,)}, "resizable datasets"),
    (((10,), h5py.vlen_dtype("f4")), "variable-length data"),
    (((10,), h5py.string_dtype()), "variable-length data"),
    (((10,), np.dtype([("a", "i4"), ("s", h5py.string_dtype())])), "variable-length data"),
    (((10,), h5py.ref_dtype), "reference data"),
    (((10,), object), "object data"),
])
def test_parallel_helper_refusals(mem_tier, spec, what):
    from mpi4py import MPI

    with pytest.raises(ValueError, match=what) as info:
        mh5.parallel_create("burst://refused.h5", MPI.COMM_SELF, {"d": spec})
    message = str(info.value)
    assert "mpiburst.h5.File" in message or "fixed-size dtype" in message  # says what to use instead
    assert not os.path.exists(os.path.join(mem_tier.bfs_root, "refused.h5"))


@pytest.mark.parametrize("shape, selection", [
    ((7,), np.s_[2:5]),
    ((4, 6), np.s_[1:3]),
    ((4, 6), np.s_[:, 2:5]),
    ((4, 6), np.s_[2, 1:4]),
    ((3, 4, 5), np.s_[1:3, 1:3, 2:4]),
    ((3, 4, 5), np.s_[1:2, :, :]),
    ((3, 4, 5), np.s_[:, 1:3, :]),
    ((3, 4, 5), np.s_[..., 4]),
    ((3, 4, 5), np.s_[0:0]),
    ((), ()),
])
def test_byte_runs_cover_exactly_the_selection(shape, selection):
    index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    starts, counts, squeezed = mh5.hyperslab(shape, selection)
    assert squeezed == index[selection].shape
    offsets, length = mh5.byte_runs(shape, 4, starts, counts)
    covered = np.concatenate([np.arange(o, o + length, 4) // 4 for o in offsets]) if length else np.zeros(0)
    np.testing.assert_array_equal(covered, index[selection].reshape(-1))
    if selection == np.s_[1:3]:
        assert len(offsets) == 1  # whole rows coalesce into one run


def test_selection_errors():
    with pytest.raises(ValueError, match="step-1"):
        mh5.hyperslab((10,), np.s_[::2])
    with pytest.raises(IndexError, match="out of range"):
        mh5.hyperslab((10, 3), np.s_[10])
    with pytest.raises(ValueError, match="more axes"):
        mh5.hyperslab((10,), np.s_[1, 2])


@pytest.mark.timeout(180)
def test_many_h5_opens_in_one_process_leak_no_connection(tier):
    """60 ``mpiburst.h5.File`` opens in one process: every close gives its connection back."""
    with mh5.File("burst://loop.h5", "w", tier=tier) as f:
        f["x"] = np.arange(10)
    before = None
    for i in range(60):
        if i == 10:  # the pool holds its few idle connections by now; 50 more opens add none (a leak: 50)
            before = _rank_connections(tier)
        with mh5.File("burst://loop.h5", "r+" if i % 2 else "r", tier=tier) as f:
            if i % 2:
                f["x"][0] = i
            assert f["x"].shape == (10,)
    assert _rank_connections(tier) <= before + 1  # +1: the engine beside the server may open one more
    with mh5.File("burst://loop.h5", "r", tier=tier) as f:
        assert f["x"][0] == 59


def _rank_connections(tier) -> int:
    """Connections the server has open for the run's ordinary user (ranks, file objects, the engine)."""
    return sum(1 for c in tier.admin().client_list() if c.get("user") == tier.conf.user)
