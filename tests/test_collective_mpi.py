"""Collectives fail together (real MPI ranks, run by tests/run.sh under mpiexec -n 2 and -n 4).

A failure on one rank must raise on every rank, whatever its type, and no
rank may wait forever: rank 0's own error (a dead server, a misspelled
option) and any rank's error in an all-ranks step.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from mpiburst import server
from mpiburst.collective import on_root, together
from mpiburst.errors import CollectiveError, ConfigError, TierConnectionError
from mpiburst.file import File
from mpiburst.testing.store import wait_for
from mpiburst.tier import Tier

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


class _Unpicklable(Exception):
    """An exception that cannot travel to another rank (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def test_on_root_gives_every_rank_the_result():
    comm = _comm()
    calls = []
    assert on_root(comm, lambda: calls.append(1) or {"rank": comm.Get_rank()}) == {"rank": 0}
    assert comm.allgather(len(calls)) == [1] + [0] * (comm.Get_size() - 1)   # only rank 0 acted


def test_on_root_raises_any_exception_on_every_rank():
    """Rank 0 keeps its own exception; the others get mpiburst and MPI errors as they are, others wrapped."""
    from mpi4py import MPI

    comm = _comm()
    root = comm.Get_rank() == 0
    with pytest.raises(TypeError if root else CollectiveError, match="takes no keyword arguments"):
        on_root(comm, lambda: dict.fromkeys([], bogus=1))
    with pytest.raises(KeyError if root else CollectiveError, match="missing"):
        on_root(comm, lambda: {}["missing"])
    with pytest.raises(_Unpicklable if root else CollectiveError, match="held a lock"):
        on_root(comm, _raise_unpicklable)
    with pytest.raises(TierConnectionError, match="lost"):
        on_root(comm, _raise_lost)
    with pytest.raises(MPI.Exception) as info:
        on_root(comm, _raise_mpi)
    assert info.value.Get_error_class() == MPI.ERR_FILE_EXISTS
    if not root:
        with pytest.raises(CollectiveError, match="rank 0 failed with _Unpicklable: held a lock"):
            on_root(comm, _raise_unpicklable)
    else:
        with pytest.raises(_Unpicklable):
            on_root(comm, _raise_unpicklable)
    comm.Barrier()


def _raise_lost():
    raise TierConnectionError("lost the connection to the tier's server")


def _raise_mpi():
    from mpi4py import MPI

    raise MPI.Exception(MPI.ERR_FILE_EXISTS)


def _raise_unpicklable():
    raise _Unpicklable("held a lock")


def test_together_raises_on_every_rank_when_one_fails():
    comm = _comm()
    last = comm.Get_size() - 1

    def act():
        if comm.Get_rank() == last:
            raise ValueError(f"rank {last} could not")
        return comm.Get_rank()

    failing = comm.Get_rank() == last
    with pytest.raises(ValueError if failing else CollectiveError, match=f"rank {last} could not"):
        together(comm, act)
    assert together(comm, comm.Get_rank) == comm.Get_rank()


def test_misspelled_start_option_raises_on_every_rank(mpi_tmp_path, server_binary):
    comm = _comm()
    with pytest.raises(ConfigError, match="unknown tier option 'capcity'"):
        Tier.start(comm, id="typo", dir=str(mpi_tmp_path), capcity="64M", server=server_binary)
    comm.Barrier()
    assert os.listdir(mpi_tmp_path) == []          # nothing was started


def test_open_after_the_server_died_raises_on_every_rank(mpi_tmp_path, server_binary):
    from mpi4py import MPI

    comm = _comm()
    bfs = mpi_tmp_path / "bfs"
    if comm.Get_rank() == 0:
        bfs.mkdir()
    comm.Barrier()
    tier = Tier.start(comm, id="dies", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="64M",
                      server=server_binary)
    try:
        pid = tier.conf.pid
        if comm.Get_rank() == 0:
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not server.pid_alive(pid, server_binary), timeout=30)
        comm.Barrier()
        with pytest.raises(TierConnectionError, match="mpiburst status"):
            File.Open(comm, "burst://after.dat", MPI.MODE_CREATE | MPI.MODE_WRONLY)
        comm.Barrier()
    finally:
        if comm.Get_rank() == 0:
            tier.stop()
        else:
            tier.disconnect()


def _lost(*args):
    raise TierConnectionError("lost the connection to the tier's server; check that the run is up with "
                              "'mpiburst status'.")


def test_rank0_steps_of_ordered_access_and_close_raise_on_every_rank(mpi_tmp_path, server_binary):
    """Write_ordered's pointer move and Close's cleanup are rank 0's alone: its failure must reach every rank."""
    from mpi4py import MPI

    comm = _comm()
    bfs = mpi_tmp_path / "bfs"
    if comm.Get_rank() == 0:
        bfs.mkdir()
    comm.Barrier()
    with Tier.start(comm, id="root0", dir=str(mpi_tmp_path), bfs_root=str(bfs), capacity="64M",
                    server=server_binary):
        f = File.Open(comm, "burst://ordered.dat", MPI.MODE_CREATE | MPI.MODE_RDWR)
        advance = f._shared.advance
        if comm.Get_rank() == 0:
            f._shared.advance = _lost              # what a server lost between two calls does
        with pytest.raises(TierConnectionError, match="mpiburst status"):
            f.Write_ordered(bytearray(b"x" * 16))
        f._shared.advance = advance
        f.Write_ordered(bytearray(b"y" * 16))      # the file is still usable on every rank
        if comm.Get_rank() == 0:
            f._shared.drop = _lost
        with pytest.raises(TierConnectionError, match="mpiburst status"):
            f.Close()
        assert f._tf is None                       # closed on every rank all the same
        comm.Barrier()
