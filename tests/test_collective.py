"""The collective helpers in one process (None, or a communicator of one rank): the action simply runs.

The many-rank behaviour is in tests/test_collective_mpi.py.
"""

from __future__ import annotations

import pytest

from mpiburst.collective import on_root, together


@pytest.mark.parametrize("comm", [None, "self"])
def test_one_process_runs_the_action_and_raises_its_own_exception(comm):
    if comm == "self":
        from mpi4py import MPI

        comm = MPI.COMM_SELF
    calls = []
    assert on_root(comm, lambda: calls.append("root") or 7) == 7
    assert together(comm, lambda: calls.append("all") or 8) == 8
    assert calls == ["root", "all"]
    with pytest.raises(KeyError, match="gone"):
        on_root(comm, lambda: {}["gone"])
    with pytest.raises(ValueError, match="bad"):
        together(comm, lambda: int("bad"))
