"""Permissions of what a flush creates on the BFS: what a direct write by the application gives.

The flush may run in another process than the one that wrote the file (the
automatic engine, ``mpiburst run``'s commit, ``mpiburst sync``), with another
umask. So the umask of the process that creates or opens a file through
mpiburst is recorded in the file's record in the tier (:func:`current_umask`),
and the flush applies it:

* a new file gets ``0666 & ~umask`` (as ``open(O_CREAT, 0666)``), given
  before the rename that makes it visible (:func:`give_final_attrs`); the
  temporary file it is written in is private (0600) until then;
* a directory the flush creates gets ``0777 & ~umask`` (:func:`make_dirs`);
* in a directory with a default ACL the kernel ignores the umask and derives
  the new entry's ACL from the default ACL and the requested mode: files are
  created with mode 0666 and directories with 0777, as a direct write would,
  and are not chmod'ed afterwards (that would change the inherited ACL's mask);
* a setgid directory's group (and, for directories, its setgid bit) is
  inherited by the kernel as for a direct write, and kept;
* a file that exists keeps its mode, owner, group and access ACL when a
  flush writes it aside and renames it over the old one; when the flusher
  may not give the new version that owner or group (another user's file it
  may write, as in a shared project directory: only root can), the flush
  copies the new bytes into the existing file in place instead, as a direct
  write would (:func:`give_final_attrs` returns False).

``mpiburst retrieve --split`` (:func:`mpiburst.channels.split`) gives its
files the same treatment under the retrieving process's umask.

Tier data (run confs, logs, sockets, snapshots) is not made here: it stays
0600/0700 (see :mod:`mpiburst.server`).
"""

from __future__ import annotations

import errno
import os
import stat
import threading

#: Extended attributes holding a POSIX ACL (Linux).
ACCESS_ACL = "system.posix_acl_access"
DEFAULT_ACL = "system.posix_acl_default"

_umask_lock = threading.Lock()


def current_umask() -> int:
    """Return this process's umask without changing it (read from ``/proc/self/status`` on Linux).

    Read with one ``os.read`` (no file object): each new tier file records
    the umask, so it is read once per ``File.Open`` and may change between.
    """
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        start = status.index(b"\nUmask:") + 7
        return int(status[start:status.index(b"\n", start)], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # no /proc: the only other way is to set it and put it back
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def has_default_acl(directory: str) -> bool:
    """Return True if ``directory`` has a default ACL (new entries in it inherit an ACL)."""
    try:
        return bool(os.getxattr(directory, DEFAULT_ACL))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise


def make_dirs(directory: str, umask: int) -> None:
    """Create ``directory`` and its missing parents as ``mkdir(0777)`` under ``umask`` would."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent != directory:
        make_dirs(parent, umask)
    inherit = has_default_acl(parent)
    mode = 0o777 if inherit else 0o777 & ~umask
    try:
        os.mkdir(directory, mode)   # never wider than the final mode: the flusher's umask only narrows it
    except FileExistsError:
        return                      # made meanwhile by another flusher: it owns its mode
    if not inherit:
        setgid = os.stat(directory).st_mode & stat.S_ISGID   # inherited from a setgid parent
        os.chmod(directory, setgid | mode)


def create_aside(path: str) -> None:
    """Create the empty temporary file ``path`` a flush writes before renaming it into place.

    It is private (0600) until :func:`give_final_attrs`; in a directory with
    a default ACL it is created as a direct ``open(O_CREAT, 0666)`` would be,
    so it inherits the ACL a direct write would get.
    """
    os.close(open_aside(path))


def open_aside(path: str, default_acl: bool | None = None) -> int:
    """:func:`create_aside`, returning the new file open for reading and writing (the caller closes it).

    ``default_acl``: whether the directory has a default ACL, when the caller
    knows (a commit looks once per directory, not once per file); None: looked up.
    """
    if default_acl is None:
        default_acl = has_default_acl(os.path.dirname(path))
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666 if default_acl else 0o600)


def give_final_attrs(fd: int, target: str, umask: int, default_acl: bool | None = None) -> bool:
    """Give the temporary file open as ``fd`` the attributes ``target`` must have after the rename.

    If ``target`` exists, its mode, owner, group and access ACL are copied
    (the rename replaces it: its attributes must survive); else the file gets
    ``0666 & ~umask``, unless its directory has a default ACL (then the file
    already has what it inherited at creation). Call it before the rename.
    ``default_acl`` not None: the caller knows ``target`` is absent (a
    listing of its directory under the flush's lock) and whether the
    directory has a default ACL; nothing is looked up.

    Returns
    -------
    bool
        True when done; False when ``target``'s owner or group cannot be
        given (``EPERM``: this process is neither root nor that owner and in
        that group), the file's attributes then unchanged: the caller must
        not rename it over ``target``, but may write ``target`` in place.

    Raises
    ------
    OSError
        If another attribute cannot be given: the caller must not rename then.
    """
    if default_acl is not None:
        if not default_acl:
            os.fchmod(fd, 0o666 & ~umask)
        return True
    try:
        old = os.stat(target)
    except FileNotFoundError:
        if not has_default_acl(os.path.dirname(target)):
            os.fchmod(fd, 0o666 & ~umask)
        return True
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)   # before the chmod: a chown clears setuid/setgid bits
        except PermissionError:
            return False
    os.fchmod(fd, stat.S_IMODE(old.st_mode))
    try:
        acl = os.getxattr(target, ACCESS_ACL)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return True
    os.setxattr(fd, ACCESS_ACL, acl)
    return True
