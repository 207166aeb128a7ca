"""Collectives that fail together: if any rank raises, every rank raises, and none waits forever.

Two shapes cover every collective step mpiburst takes:

* :func:`on_root`: rank 0 acts (starts the server, registers a file, plans a
  flush) and every rank gets its result, or its exception;
* :func:`together`: every rank acts (pushes its buffer, writes its stripes),
  then all agree: if one rank failed, every rank raises.

The rank where an exception happened raises it unchanged (its traceback
included). The other ranks raise the same exception when it is one of
mpiburst's errors or an ``mpi4py.MPI.Exception`` (same error class), and
otherwise a :class:`~mpiburst.errors.CollectiveError` (an mpiburst error)
naming the failing rank, the original type and its message. Only :class:`Exception` is caught: an interrupt
or ``SystemExit`` ends the process, and the MPI job with it.

``comm`` may be None for a single process (mpi4py is then never imported);
with None or a communicator of one rank the action simply runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CollectiveError, MpiburstError

if TYPE_CHECKING:   # mpi4py is imported only by those who pass a communicator
    from mpi4py import MPI

T = TypeVar("T")


def on_root(comm: MPI.Comm | None, action: Callable[[], T], root: int = 0) -> T:
    """Run ``action`` on rank ``root`` of ``comm`` only; return its result on every rank (collective).

    Parameters
    ----------
    comm
        An ``mpi4py.MPI.Comm``, or None for a single process.
    action
        Called with no arguments on the root only. Its result must pickle.

    Returns
    -------
    The result of ``action``, on every rank.

    Raises
    ------
    Exception
        On every rank, what ``action`` raised: the original exception on the
        root; on the others the same mpiburst or MPI error, else a
        :class:`~mpiburst.errors.CollectiveError` with its type and message.
    """
    if comm is None or comm.Get_size() == 1:
        return action()
    failure: Exception | None = None
    message: bytes | None = None
    if comm.Get_rank() == root:
        try:
            message = _packed((True, action()))
        except Exception as exc:
            failure = exc
            message = _packed((False, _portable(exc, root)))
    ok, value = pickle.loads(comm.bcast(message, root=root))
    if failure is not None:
        raise failure
    if not ok:
        raise value
    return value


def together(comm: MPI.Comm | None, action: Callable[[], T]) -> T:
    """Run ``action`` on every rank of ``comm``; if it raised on any rank, raise on every rank (collective).

    Returns
    -------
    This rank's result of ``action``, when no rank failed.

    Raises
    ------
    Exception
        On a rank where ``action`` failed, its own exception; on the others
        the first failing rank's exception (or a
        :class:`~mpiburst.errors.CollectiveError` naming it).
    """
    if comm is None or comm.Get_size() == 1:
        return action()
    failure: Exception | None = None
    result: Any = None
    try:
        result = action()
    except Exception as exc:
        failure = exc
    rank = comm.Get_rank()
    failures = comm.allgather(None if failure is None else _packed(_portable(failure, rank)))
    if failure is not None:
        raise failure
    for packed in failures:
        if packed is not None:
            raise pickle.loads(packed)
    return result


def _portable(exc: Exception, rank: int) -> Exception:
    """What the other ranks raise for ``exc``: itself (an mpiburst or MPI error that pickles), else a CollectiveError."""
    if isinstance(exc, MpiburstError) or type(exc).__module__ == "mpi4py.MPI":
        try:
            copy = pickle.loads(pickle.dumps(exc))
            if type(copy) is type(exc) and str(copy) == str(exc):
                return exc
        except Exception:
            pass
    return CollectiveError(f"rank {rank} failed with {type(exc).__name__}: {exc}")


def _packed(outcome: Any) -> bytes:
    """Pickle ``outcome``; a result that does not pickle becomes the error saying so."""
    try:
        return pickle.dumps(outcome)
    except Exception as exc:
        return pickle.dumps((False, CollectiveError(f"a collective's result could not be sent to the other "
                                                    f"ranks ({type(exc).__name__}: {exc}); this is a bug in "
                                                    "mpiburst, please report it.")))
