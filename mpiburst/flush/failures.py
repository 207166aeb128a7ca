"""How a flush failure is said: one phrase per cause, and the error every flusher raises.

Every step of a flush turns what went wrong (a full BFS, a lost server, a
lost lease) into one short phrase (:func:`cause`); :func:`failed` wraps it in
the :class:`~mpiburst.errors.FlushError` a sync raises on every rank, which
says that the data stays dirty in the tier.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import Any

from ..errors import FlushError, MpiburstError, NodeLostError, TierConnectionError


class LeaseLost(Exception):
    """The flush lease expired or was released by a failing flusher."""


class Busy(FlushError):
    """Another flush holds the file (its BFS lock or its flush lease), and the caller chose not to wait."""


LEASE_LOST = "the flush lease was lost (another flusher failed, or this one stalled past the lease)"


def failed(target: str, cause: str) -> FlushError:
    """The error of a failed sync: its cause, and that nothing was lost."""
    return FlushError(f"sync of {target} failed: {cause}; the data stays dirty in the tier, "
                      f"fix the cause and run the sync again.")


def cause(exc: BaseException) -> str:
    """Return the cause of a flush failure as a short phrase."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]{where}"
    if isinstance(exc, NodeLostError):   # a multi-node run: say which server, and whose data it held
        held = f" holding data of {', '.join(exc.files)}" if exc.files else ""
        return f"the connection to the tier server of node {exc.node}{held} was lost"
    if isinstance(exc, TierConnectionError):
        return "the connection to the tier's server was lost"
    if isinstance(exc, LeaseLost):
        return LEASE_LOST
    if isinstance(exc, MpiburstError):
        return str(exc).rstrip(".")
    return f"{type(exc).__name__}: {exc}"


def quiet(action: Callable[[], Any]) -> None:
    """Run a clean-up step whose failure must not hide the original error."""
    with contextlib.suppress(OSError, MpiburstError):
        action()
