"""``mpiburst status --watch``: a run's fill, dirty data and traffic, refreshed until Ctrl-C or ``--count``."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, TextIO

from ..errors import MpiburstError
from ..sizes import format_size

#: Longest sleep between two looks at whether Ctrl-C was pressed (a signal does not cut a sleep short).
NAP = 0.1


def sample(tier: Any) -> dict[str, Any]:
    """Return what one refresh shows: memory used and capacity, dirty files and bytes, the servers' traffic."""
    from .. import iostats, residency

    used, cap = tier.store.memory()
    dirty = residency.dirty_files(tier, include_pinned=True)
    got, sent = tier.store.traffic() or (0, 0)   # every node's server on a multi-node run
    return {"t": time.monotonic(), "used": used, "capacity": cap or tier.capacity, "dirty_files": len(dirty),
            "dirty_bytes": iostats.dirty_bytes(tier.store, dirty), "in": got, "out": sent}


def line(now: dict[str, Any], before: dict[str, Any] | None) -> str:
    """Return one refresh as a line: fill, dirty data, and the rates into and out of the tier since ``before``."""
    share = now["used"] / now["capacity"] if now["capacity"] else 0.0
    text = (f"{time.strftime('%H:%M:%S')}  fill {format_size(now['used'])} of {format_size(now['capacity'])} "
            f"({share:.0%})  dirty {format_size(now['dirty_bytes'])} in {now['dirty_files']} file(s)")
    if before is None:
        return text + "  in -  out -"
    dt = max(now["t"] - before["t"], 1e-9)
    rate_in = max(now["in"] - before["in"], 0) / dt
    rate_out = max(now["out"] - before["out"], 0) / dt
    return text + f"  in {format_size(int(rate_in))}/s  out {format_size(int(rate_out))}/s"


def watch(conf_path: str, interval: float, count: int | None, stream: TextIO | None = None) -> int:
    """Refresh the run's line every ``interval`` seconds, ``count`` times or until Ctrl-C; return the exit status.

    On a terminal the line is redrawn in place; elsewhere each refresh is a
    new line. Ctrl-C ends it cleanly (status 0); a server that goes away
    ends it with one line and status 3. Ctrl-C only sets a flag that the
    loop reads between refreshes: raised as KeyboardInterrupt, it could land
    in a finalizer run by the garbage collector, which reports and drops it,
    and the watch would go on.
    """
    from ..tier import Tier

    out = stream if stream is not None else sys.stdout
    tty = out.isatty()
    stopped: list[int] = []
    tier = Tier.connect(conf=conf_path)
    before = None
    shown = 0
    previous = _on_interrupt(stopped)
    try:
        while (count is None or shown < count) and not (shown and _nap(interval, stopped)):
            now = sample(tier)
            text = line(now, before)
            out.write(f"\r{text}\x1b[K" if tty else text + "\n")
            out.flush()
            before = now
            shown += 1
    except MpiburstError as exc:
        out.write("\n" if tty else "")
        print(f"mpiburst status: run {tier.id}: {exc}", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        tier.disconnect()
    if tty:
        out.write("\n")
    return 0


def _on_interrupt(stopped: list[int]) -> Any:
    """Append to ``stopped`` on SIGINT instead of raising KeyboardInterrupt; return the handler replaced.

    Off the main thread (where no handler can be set) nothing changes and None is returned.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(signum))


def _nap(seconds: float, stopped: list[int]) -> bool:
    """Sleep ``seconds`` in steps of at most :data:`NAP`, ending early once ``stopped``; return whether it is."""
    end = time.monotonic() + seconds
    while not stopped and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, NAP))
    return bool(stopped)
