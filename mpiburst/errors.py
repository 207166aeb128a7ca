"""The exceptions mpiburst raises: one small hierarchy, each with a process exit code.

Every message is one sentence that says what went wrong and what to do, so the
CLI can print it as is (no traceback) and exit with ``exit_code``. An error
that escapes an application (a rank's) is printed the same way, as one line,
by the hook :func:`install_excepthook` puts in place when ``mpiburst`` is
imported; ``MPIBURST_DEBUG=1`` gives the full traceback with its causes.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType


class MpiburstError(Exception):
    """Base class of every error mpiburst raises on purpose."""

    exit_code: int = 1


class ConfigError(MpiburstError):
    """A run's configuration is missing, unsafe or invalid (ID, conf file, option)."""

    exit_code = 2


class ServerError(MpiburstError):
    """The tier's server cannot be found, started, reached or stopped."""

    exit_code = 13


class TierConnectionError(ServerError):
    """The connection to the tier's server was lost, refused or timed out."""

    exit_code = 13


class NodeLostError(TierConnectionError):
    """The server of one node of a multi-node run cannot be reached.

    Attributes
    ----------
    node : int
        The node's index (node 0 holds every file's record).
    files : tuple of str
        The files whose data that server held, when known.
    """

    exit_code = 13

    def __init__(self, message: str, node: int = -1, files: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.node = node
        self.files = tuple(files)

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.node, self.files)


class ReplicaError(TierConnectionError):
    """A node's replica did not confirm a write in time: the data is on one node only (a run with ``replicas=1``)."""


class CollectiveError(MpiburstError):
    """Another rank failed in a collective call with an error that could not travel as it was."""

    exit_code = 1


class CheckpointError(MpiburstError):
    """A checkpoint was not saved, cannot be restored, or its background flush failed."""

    exit_code = 1


class AuthenticationError(ServerError):
    """The server refused the credentials in the run's conf file."""

    exit_code = 51


class TierFullError(MpiburstError):
    """The tier is full and nothing in it can be flushed or freed to make room."""

    exit_code = 28


class PathError(MpiburstError):
    """A path is malformed or resolves outside the run's BFS root."""

    exit_code = 2


class OffsetError(MpiburstError):
    """An offset or size lies beyond what the tier can store exactly (see :data:`mpiburst.writeback.MAX_OFFSET`)."""

    exit_code = 27  # EFBIG


class FlushError(MpiburstError):
    """A flush to the backing filesystem failed; the data stays dirty in the tier."""

    exit_code = 5


class PolicyError(MpiburstError):
    """A stage-in / stage-out policy file has a bad line."""

    exit_code = 2


class ChannelError(MpiburstError):
    """A mem_io-style channel is out of range or busy (mem_io's exit codes)."""

    exit_code = 21


class ChannelBusyError(ChannelError):
    """A channel already has a writer (mem_io exits 24)."""

    exit_code = 24


class DeviceBufferError(MpiburstError, TypeError):
    """A buffer in device memory that mpiburst cannot stage: no CUDA runtime for a CUDA DLPack device, or not CUDA."""


#: Set (to anything but ``0`` or empty) to print mpiburst errors with their full traceback and causes.
DEBUG_ENV = "MPIBURST_DEBUG"


def debugging() -> bool:
    """True if ``$MPIBURST_DEBUG`` asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(exc: BaseException) -> str:
    """Return how an uncaught mpiburst error is printed: its class and its sentence, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text} [{DEBUG_ENV}=1 shows the traceback]"


def install_excepthook() -> None:
    """Print an uncaught :class:`MpiburstError` as one line (:func:`one_line`) instead of a traceback.

    Installed when ``mpiburst`` is imported, so it covers a rank that fails
    before it ever reached the tier. Every other exception, and every
    exception when ``$MPIBURST_DEBUG`` is set, goes to the hook that was
    there before (Python's: the traceback with its chained causes). The
    error keeps its cause (``__cause__``, e.g. the redis-py exception) for
    code that catches it. Installing twice is a no-op.
    """
    previous = sys.excepthook
    if getattr(previous, "_mpiburst", False):
        return

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, MpiburstError) and not debugging():
            sys.stderr.write(one_line(exc) + "\n")
            sys.stderr.flush()
            return
        previous(kind, exc, tb)

    hook._mpiburst = True  # type: ignore[attr-defined]
    sys.excepthook = hook
