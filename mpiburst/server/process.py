"""A run's processes: liveness by PID (never by name), waiting, killing, the server log's tail.

The servers and engines this process started are kept in one registry,
:data:`_children` (see :func:`adopt`), so they can be reaped: a dead child
stays a zombie until its parent waits for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

# Servers and engines this process started, so it can reap them (a dead child is a zombie until waited for).
_children: dict[int, subprocess.Popen] = {}


def adopt(proc: subprocess.Popen) -> int:
    """Register a server or engine this process started (for :func:`pid_alive` to reap); return its PID."""
    _children[proc.pid] = proc
    return proc.pid


def forget(pid: int) -> None:
    """Drop ``pid`` from the registry (it was reaped)."""
    _children.pop(pid, None)


def pid_alive(pid: int | None, binary: str | None = None) -> bool:
    """Return True if ``pid`` is a live (non-zombie) process running ``binary`` (when given)."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the PID was reused, our server is gone
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                if child is not None and child.poll() is not None:
                    del _children[pid]  # our own child just exited: reap it, so nobody sees it linger
                return False
    except (FileNotFoundError, ProcessLookupError):
        # Reaped by its parent (another process) between the signal check and this read: the open
        # fails, or the open succeeds and the read fails with ESRCH.
        return False
    except (OSError, IndexError):
        pass
    if binary:
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/exe")) != os.path.realpath(binary):
                return False
        except OSError:
            return _exists(pid)  # an exiting process has no exe link for a moment: alive until reaped
    return True


def _unreaped(pid: int | None) -> bool:
    """Return True while ``pid`` is a child of this process that is still exiting (reaping it once it can be).

    False once it is reaped, or once it has exited whole while a ``wait``
    elsewhere in this thread holds it (a signal handler that interrupted
    ``Popen.wait``): that wait reaps it.
    """
    child = _children.get(pid) if pid else None
    if child is None:
        return False
    if child.poll() is not None:
        del _children[child.pid]
        return False
    try:   # poll() also says None when another wait holds the child: ask the kernel without reaping
        return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def engine_alive(pid: int | None, run_dir: str) -> bool:
    """Return True if ``pid`` is the engine of the run in ``run_dir``: alive, ``python -m mpiburst.engine``, working there.

    The engine is a Python process like many others: once it has exited, its
    PID may go to another one (PIDs wrap after 32768 on many systems), which
    a signal meant for the engine must never reach.
    """
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    engine = any(argv[i:i + 2] == [b"-m", b"mpiburst.engine"] for i in range(len(argv)))
    return engine and os.path.realpath(cwd) == os.path.realpath(run_dir)


def _exists(pid: int) -> bool:
    """Return True if a process (perhaps a zombie) still has ``pid``."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False  # gone, or the PID was reused by another user's process
    return True


def wait_gone(pid: int | None, binary: str | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; return True if it did (at once for None: no process).

    A child of this process is gone only once reaped: its main thread can
    show as a zombie (not alive, for :func:`pid_alive`) while its other
    threads still exit, and until they have it cannot be reaped.
    """
    deadline = time.monotonic() + timeout
    while pid_alive(pid, binary) or _unreaped(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill(pid: int | None, binary: str | None) -> None:
    """SIGKILL our process ``pid`` (if it still runs; None: no process) and wait for it to vanish."""
    if pid is not None and pid_alive(pid, binary):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, binary, 10.0)


def log_tail(path: str, lines: int = 8) -> str:
    """Return the last ``lines`` non-empty lines of the server log, joined by ' | '."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(tail) or "(empty log)"


def die_with_parent() -> None:
    """In the server's child process: ask Linux to SIGTERM it when the starting process dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_exit(pid: int | None, binary: str | None) -> None:
    """Block until the run's server process ends (for ``mpiburst start --foreground``; None: no process)."""
    if pid is None:
        return
    child = _children.get(pid)
    if child is not None:
        child.wait()
    else:
        wait_gone(pid, binary, float("inf"))

