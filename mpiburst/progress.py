"""Live progress of a long operation (a sync, a prestage, a stage-out or commit): bytes, rate, time left.

A :class:`Meter` is fed the bytes done so far (from any thread) and shows
them on a stream: on a terminal as one bar refreshed in place (at most
:data:`TTY_EVERY` apart), elsewhere (a log file, a batch job's output) as a
plain line every :data:`LINE_EVERY` seconds, so a log gets a few lines, not
thousands. The rate is the average since the start; the time left is the
bytes still expected at that rate, once a total is known.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from .sizes import format_size

#: Seconds between two refreshes of the bar on a terminal.
TTY_EVERY = 0.1
#: Seconds between two plain lines when the stream is not a terminal.
LINE_EVERY = 5.0
#: Width of the bar in characters.
BAR = 24


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
        until :meth:`finish`); None if unknown.
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
            share = 1.0 if final else min(self.done / self.total, 0.99)
            left = max(self.total - self.done, 0) / rate if rate > 0 else None
            text = f"{format_size(self.done)} of {format_size(self.total)} ({share:.0%}), {format_size(int(rate))}/s"
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
