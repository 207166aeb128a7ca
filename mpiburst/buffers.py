"""Large byte buffers reused across calls instead of allocated afresh.

A fresh multi-MiB ``bytearray`` is zeroed memory the kernel must fault in
page by page on first touch; on virtual machines that runs at well under
1 GB/s, slower than the copies the buffer is for. The flush's batch buffers
and the fetch's scratch space therefore come from this small pool, which
keeps at most :data:`KEEP` bytes between uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Bytes of idle buffers the pool keeps for the next caller.
KEEP = 64 << 20

_lock = threading.Lock()
_idle: list[bytearray] = []


@contextmanager
def borrowed(n: int) -> Iterator[memoryview]:
    """Lend a writable ``memoryview`` of ``n`` bytes (contents undefined) for the ``with`` block."""
    with _lock:
        fits = [b for b in _idle if len(b) >= n]
        buf = min(fits, key=len) if fits else None
        if buf is not None:
            _idle.remove(buf)
    if buf is None:
        buf = bytearray(n)
    view = memoryview(buf)[:n]
    try:
        yield view
    finally:
        view.release()
        with _lock:
            if len(buf) + sum(len(b) for b in _idle) <= KEEP:
                _idle.append(buf)
