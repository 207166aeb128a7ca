"""The alignment of flush writes on the backing filesystem (BFS).

Large writes that start and end on the BFS's natural boundary avoid
read-modify-write cycles and lock contention between writers. The boundary is,
in order: an explicit setting, the Lustre stripe size (``lfs getstripe -S``)
when ``lfs`` exists and answers for the path, else the filesystem block size
rounded up to a multiple of 1 MiB.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from .errors import ConfigError
from .sizes import parse_size

MIB = 1 << 20


def _lustre_stripe_size(path: str) -> int | None:
    """Return the Lustre stripe size of ``path`` in bytes, or None when not on Lustre."""
    lfs = shutil.which("lfs")
    if lfs is None:
        return None
    try:
        out = subprocess.run([lfs, "getstripe", "-S", path], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        size = int(out.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return size if size > 0 else None


def detect_align(path: str, setting: str | int | None = None) -> int:
    """Return the flush alignment in bytes for files under ``path``.

    Parameters
    ----------
    path
        A directory (or file) on the BFS; the nearest existing parent is examined.
    setting
        An explicit alignment (``"4M"``, ``1048576``); wins when given.

    Raises
    ------
    ConfigError
        If ``setting`` is not a positive size.
    """
    if setting is not None:
        align = parse_size(setting, "alignment")
        if align <= 0:
            raise ConfigError(f"alignment must be positive (got {setting!r}); give a size such as 1M.")
        return align
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    stripe = _lustre_stripe_size(probe)
    if stripe:
        return stripe
    block = os.statvfs(probe).f_bsize or 4096
    return -(-block // MIB) * MIB
