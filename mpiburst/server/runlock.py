"""One starter per run: an exclusive ``flock`` on ``DIR/.mpiburst_<id>.lock`` while a run is being started.

Two ``mpiburst start`` (or ``mpiburst run``, or ``Tier.start``) with the same
run ID in the same directory would otherwise both find no live server, both
start one, and the second's conf would replace the first's: an orphan server
and, for ``mpiburst run``, a job whose data went to a server nobody syncs.
The lock makes the second one fail at once with a sentence naming the holder.
``mpiburst run`` holds it for the whole job, so a second job step with the
same ID is refused instead of sharing (and stopping) the first one's tier.

The lock is re-entrant within one process (``mpiburst run`` holds it and then
starts the server), never waited for, released by the kernel when its holder
dies, and its file is removed by the last release. A holder checks after
locking that the path still names the file it locked, so a lock file removed
meanwhile is never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from typing import Any

from ..errors import ConfigError
from ..runconf import lock_path

# Locks this process holds: path -> [fd, depth].
_held: dict[str, list[int]] = {}


class RunLock:
    """Context manager holding the start lock of run ``run_id`` in ``directory``.

    Parameters
    ----------
    holder
        Who holds it, for the refusal message of another process (``mpiburst run``).

    Raises
    ------
    ConfigError
        On entry, if another process holds the lock, or the lock path is not a
        regular file of this user.
    """

    def __init__(self, directory: str, run_id: str, holder: str) -> None:
        self.path = lock_path(directory, run_id)
        self.run_id = run_id
        self.holder = holder

    def __enter__(self) -> RunLock:
        held = _held.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        while True:
            fd = _open_lock(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read_holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"run {self.run_id} is being started or used by {other} in {os.path.dirname(self.path)}; "
                    f"wait for it to finish, or give this one another --id or --dir."
                ) from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.holder}\n".encode(), 0)
        _held[self.path] = [fd, 1]
        return self

    def __exit__(self, *exc: Any) -> None:
        held = _held[self.path]
        held[1] -= 1
        if held[1]:
            return
        del _held[self.path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiter that opened it sees the inode vanish
        os.close(held[0])


def _open_lock(path: str) -> int:
    """Open (creating 0600) the lock file without following links or blocking; check it is ours."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the run's lock file {path} ({exc.strerror}); remove it if it is not "
                          f"a regular file of yours, or choose another --dir.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(f"the run's lock file {path} is not a regular file of yours; remove it, or choose "
                          f"another --dir.")
    return fd


def _read_holder(fd: int) -> str:
    """Return who holds the lock, from its file ('PID what'), for a message."""
    try:
        pid, _, what = os.pread(fd, 200, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return "another process"
    return f"{what or 'another process'} (PID {pid})" if pid.isdigit() else "another process"
