"""Live progress of a long operation (a sync, a prestage, a stage-out or commit): bytes, rate, time left.

A :class:`Meter` is fed the bytes done so far (from any thread) and shows
them on a stream: on a terminal as one bar refreshed in place (at most
:data:`TTY_EVERY` apart), elsewhere (a log file, a batch job's output) as a
plain line every :data:`LINE_EVERY` seconds, so a log gets a few lines, not
thousands. The rate is the average since the start; the time left is the
bytes still expected at that rate, once a total is known.

A :class:`JobBytes` turns one process's bytes done into the whole job's, for
the progress of a collective operation (a collective ``mpiburst.sync``):
each process adds its new bytes to one counter they share, at most every
:data:`SHARE_EVERY` seconds, and no collective call is made.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from .sizes import format_size

#: Seconds between two refreshes of the bar on a terminal.
TTY_EVERY = 0.1
#: Seconds between two plain lines when the stream is not a terminal.
LINE_EVERY = 5.0
#: Width of the bar in characters.
BAR = 24
#: Seconds between two additions of one process's bytes to a job's shared counter (:class:`JobBytes`).
SHARE_EVERY = 0.25


def _duration(seconds: float) -> str:
    """Return ``seconds`` as ``1:02:03``, ``2:03`` or ``3 s``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Meter:
    """Show the progress of ``label``: bytes done of ``total`` (if known), rate and time left.

    Parameters
    ----------
    label
        What is being done, e.g. ``"sync /scratch/a.dat"``.
    total
        Bytes expected (an estimate is fine: the shown share stops at 99 %
        until :meth:`finish`, the shown total is never less than the bytes
        done, and the final line's total is the bytes done); None if unknown.
    stream
        Where to write (default: standard error).
    tty
        Draw a bar in place (default: whether ``stream`` is a terminal).
    every
        Seconds between two plain lines (not on a terminal).
    """

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 tty: bool | None = None, every: float = LINE_EVERY) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = TTY_EVERY if self.tty else every
        self.done = 0
        self.started = time.monotonic()
        self._shown = self.started
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """Count ``n`` more bytes done (thread-safe) and show them if a refresh is due."""
        with self._lock:
            self.done += n
            self._maybe_show()

    def update(self, done: int) -> None:
        """Set the bytes done so far (thread-safe) and show them if a refresh is due."""
        with self._lock:
            self.done = done
            self._maybe_show()

    def expect(self, total: int) -> None:
        """Set the bytes expected in all."""
        with self._lock:
            self.total = total

    def _maybe_show(self) -> None:
        now = time.monotonic()
        if now - self._shown >= self.every:
            self._shown = now
            self._show(now, final=False)

    def line(self, now: float | None = None, final: bool = False) -> str:
        """Return the progress as one line: bytes (of the total), share, rate, time left or taken."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            # The total is an estimate: never shown below what is done, and at the end it is what was done,
            # so the line always adds up (never "16.0 MiB of 12.0 MiB").
            total = self.done if final else max(self.total, self.done)
            share = 1.0 if final else min(self.done / total, 0.99) if total else 0.0
            left = max(total - self.done, 0) / rate if rate > 0 else None
            text = f"{format_size(self.done)} of {format_size(total)} ({share:.0%}), {format_size(int(rate))}/s"
            if final:
                text += f", {_duration(elapsed)}"
            elif left is not None:
                text += f", {_duration(left)} left"
        else:
            share = 1.0 if final else 0.0
            text = f"{format_size(self.done)}, {format_size(int(rate))}/s" + (f", {_duration(elapsed)}" if final else "")
        if self.tty:
            filled = int(share * BAR)
            return f"{self.label} [{'#' * filled}{'.' * (BAR - filled)}] {text}"
        return f"{self.label}: {text}" + (" done" if final else "")

    def _show(self, now: float, final: bool) -> None:
        text = self.line(now, final)
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Show the final line (bytes, average rate, time taken)."""
        with self._lock:
            self._show(time.monotonic(), final=True)


class JobBytes:
    """The bytes done by every process of a job, as one process sees them, for a collective operation's progress.

    Each process feeds its own bytes done so far to :meth:`update` (from any
    thread). At most every ``every`` seconds, and at :meth:`close`, it adds
    the bytes new since its last addition to a counter every process of the
    job shares (``add``: one call to the tier), whose answer gives the other
    processes' bytes. ``show``, if given, gets this process's bytes plus the
    others' as of that answer (at most about ``every`` seconds old, but for
    a process that has not added its first bytes yet), on every update.

    Parameters
    ----------
    add
        Adds its argument to the shared counter and returns the counter's new value.
    show
        Called with the job's bytes done (e.g. :meth:`Meter.update`); None to only share this process's.
    every
        Seconds between two calls of ``add`` (default :data:`SHARE_EVERY`).
    """

    def __init__(self, add: Callable[[int], int], show: Callable[[int], None] | None = None,
                 every: float | None = None) -> None:
        self._add = add
        self._show = show
        self.every = SHARE_EVERY if every is None else every
        #: This process's bytes done.
        self.mine = 0
        #: Whether ``add`` was called (the shared counter exists).
        self.shared = False
        self._added = 0      # of self.mine, what the counter has
        self._others = 0     # the other processes' bytes in the counter's last answer
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def update(self, mine: int) -> None:
        """Set this process's bytes done so far; share them if due; show the job's."""
        with self._lock:
            self.mine = max(self.mine, mine)   # threads may report out of order
            now = time.monotonic()
            if now - self._last >= self.every:
                self._last = now
                self._share()
            if self._show is not None:
                self._show(self.mine + self._others)

    def close(self) -> None:
        """Add what this process has not shared yet (its part is done)."""
        with self._lock:
            self._share()

    def _share(self) -> None:
        delta = self.mine - self._added
        if delta:
            self.shared = True
            total = self._add(delta)
            self._added = self.mine
            self._others = total - self.mine
