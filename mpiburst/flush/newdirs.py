"""A commit's new directories: their files written under their final names in a hidden staging directory, published by one rename.

A file-per-process checkpoint is usually a new directory (``step-42/``, one
file per rank). Renaming each file's new version into place costs one
rename per file, and renames in one directory are serialised by the kernel
(200 renames: 0.6 s on GlusterFS, longer than writing and fsyncing the
files). So when the cut's files lie in a directory that does not exist yet
on the BFS, the commit stages them instead:

1. under the lock of the topmost missing directory's parent (one
   :class:`~mpiburst.flush.snapshot.BfsLock`, taken with the commit's other
   directories in path order), it checks that directory is still missing,
   removes the staging directories killed commits left for it, and makes
   ``.<name>.mpiburst-stage-<token>`` beside it, holding the missing
   directories below it, each with the mode the per-file path's
   :func:`~mpiburst.perms.make_dirs` gives (``0777 & ~umask``, or inherited
   from a default ACL, and a setgid parent's group);
2. every file is written and fsync'd in there under its final name, as the
   per-file path writes its new version aside (private until sealed);
3. before the commit's journal, every staged directory is fsync'd; the
   journal names ``[staging directory, final directory]`` like a file's rename;
4. :func:`publish` renames the staging directory to its final name (one
   rename) and the commit fsyncs the parent.

``rename(2)`` replaces an empty directory at the target, so :func:`publish`
never renames over one it did not make: ``renameat2(RENAME_NOREPLACE)``
where the filesystem takes it; elsewhere (FUSE filesystems such as
GlusterFS answer ``EINVAL``) it claims the name with ``mkdir`` and renames
over its own empty claim. If the name was taken meanwhile (another run, the
application), the staged entries are moved into the existing directory
instead (:func:`merge`: each missing entry by one rename, each file over an
existing one as the per-file path renames). The journal's recovery runs
the same :func:`publish`, so a commit killed at any point after its journal
is completed; one killed before it leaves a staging directory that nothing
sees, removed by the next commit that stages the same directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import FlushError
from ..perms import has_default_acl, make_dirs
from .failures import Busy, cause
from .snapshot import BfsLock, lock_directories
from .writes import fsync_dir

#: A staging directory is named ``.<final name>`` then this, then a token.
_STAGE = ".mpiburst-stage-"


@dataclass(frozen=True)
class Stage:
    """One new directory of a commit: ``top`` (missing on the BFS) staged as ``root`` beside it."""

    top: str
    root: str

    def staged(self, directory: str) -> str:
        """Return where ``directory`` (``top`` or below it) lies inside the staging directory."""
        rel = os.path.relpath(directory, self.top)
        return self.root if rel == "." else os.path.join(self.root, rel)


@dataclass
class Layout:
    """How a commit publishes its directories: the locks rank 0 holds, its stages, where each new directory's files go."""

    locks: list[BfsLock]
    stages: list[Stage]
    #: each directory of the cut that is staged → (its staged path, whether it has a default ACL)
    staged: dict[str, tuple[str, bool]]


def topmost_missing(directory: str, bfs_root: str) -> str | None:
    """Return the topmost missing directory of ``directory``'s path strictly inside ``bfs_root``, or None.

    None when ``directory`` exists, or when what lies above the missing part
    is not a directory inside the root (the per-file path then says what is wrong).
    """
    root = os.path.join(bfs_root, "")
    if os.path.lexists(directory) or not directory.startswith(root):
        return None
    top = directory
    while True:
        parent = os.path.dirname(top)
        if not parent.startswith(root) and parent != bfs_root:
            return None
        if os.path.lexists(parent):
            return top if os.path.isdir(parent) and not os.path.islink(parent) else None
        top = parent


def layout(dirs: dict[str, int], bfs_root: str, token: str, wait: float | None, stage: bool) -> Layout:
    """Lock a commit's directories and stage the missing ones (rank 0); see the module docstring.

    ``dirs``: each directory of the cut → the umask its files were made
    under. ``stage`` False: every directory is made and locked as the
    per-file path does (:func:`~mpiburst.flush.snapshot.lock_directories`).
    A missing directory found made once its parent is locked raises
    :class:`~mpiburst.flush.failures.Busy` (the commit is then made by rank
    0 alone, file by file, with ``stage`` False).
    """
    tops: dict[str, list[str]] = {}
    for directory in sorted(dirs):
        top = topmost_missing(directory, bfs_root) if stage else None
        if top is not None:
            tops.setdefault(top, []).append(directory)
    kept = {d: u for d, u in dirs.items() if not any(d in under for under in tops.values())}
    # the stages' parents are locked like the commit's other directories, all in path order
    wanted = dict(kept)
    for top, under in tops.items():
        wanted.setdefault(os.path.dirname(top), dirs[under[0]])
    locks = lock_directories(wanted, wait)
    stages: list[Stage] = []
    staged: dict[str, tuple[str, bool]] = {}
    try:
        for top, under in sorted(tops.items()):
            if os.path.lexists(top):   # made meanwhile, before we held its parent's lock
                raise Busy(f"{top} was made while a commit was about to make it.")
            remove_leftovers(top)
            one = Stage(top, os.path.join(os.path.dirname(top), f".{os.path.basename(top)}{_STAGE}{token}"))
            stages.append(one)
            make_dirs(one.root, dirs[under[0]])
            for directory in under:
                make_dirs(one.staged(directory), dirs[directory])
            for directory in under:
                where = one.staged(directory)
                staged[directory] = (where, has_default_acl(where))
    except BaseException as exc:
        for one in stages:
            remove(one.root)
        for lock in locks:
            lock.release()
        if isinstance(exc, OSError):
            raise FlushError(f"cannot stage {exc.filename or 'a new directory'} for a commit: {cause(exc)}; "
                             "the data stays dirty in the tier, fix the cause and run again.") from None
        raise
    return Layout(locks, stages, staged)


def remove_leftovers(top: str) -> None:
    """Remove the staging directories killed commits left for ``top`` (the caller holds its parent's lock)."""
    parent, name = os.path.split(top)
    prefix = f".{name}{_STAGE}"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(parent):
            if entry.startswith(prefix):
                remove(os.path.join(parent, entry))


def remove(root: str) -> None:
    """Remove a staging directory and what it holds (a commit that failed before its journal)."""
    shutil.rmtree(root, ignore_errors=True)


def fsync_staged(stages: Iterable[Stage], staged: Iterable[str]) -> None:
    """Fsync every directory of the stages (the ``staged`` directories and those between them and their root)."""
    done: set[str] = set()
    roots = [s.root for s in stages]
    for directory in staged:
        while directory not in done:
            fsync_dir(directory)
            done.add(directory)
            if directory in roots:
                break
            directory = os.path.dirname(directory)


def publish(root: str, top: str) -> None:
    """Make the staging directory ``root`` the directory ``top``: one rename, or a merge if ``top`` exists.

    Idempotent, for the journal's recovery: a ``root`` already renamed
    (missing) is done. The caller fsyncs ``top``'s parent.
    """
    if not os.path.lexists(root):
        return
    try:
        rename_noreplace(root, top)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        if _claim(root, top):
            try:
                os.rename(root, top)   # over our own empty claim
                return
            except OSError as again:
                if again.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
    merge(root, top)


def _claim(root: str, top: str) -> bool:
    """Make ``top`` as an empty directory with ``root``'s mode, as :func:`~mpiburst.perms.make_dirs` would; False if it exists."""
    mode = stat.S_IMODE(os.stat(root).st_mode) & 0o777
    inherit = has_default_acl(os.path.dirname(top))
    try:
        os.mkdir(top, 0o777 if inherit else mode)
    except FileExistsError:
        return False
    if not inherit:
        os.chmod(top, (os.stat(top).st_mode & stat.S_ISGID) | mode)
    return True


def merge(root: str, top: str) -> None:
    """Move what the staging directory ``root`` holds into the existing directory ``top``, then remove ``root``.

    An entry ``top`` lacks is moved by one rename (a whole directory at
    once); a directory it has is merged the same way; a file is renamed over
    the existing one (as the per-file path renames a new version). Each
    directory that gained entries is fsync'd.
    """
    changed = False
    for entry in os.listdir(root):
        src, dst = os.path.join(root, entry), os.path.join(top, entry)
        if os.path.isdir(dst) and not os.path.islink(dst) and os.path.isdir(src) and not os.path.islink(src):
            merge(src, dst)
            continue
        try:
            rename_noreplace(src, dst)
        except OSError:
            if os.path.isdir(src) and os.path.lexists(dst):
                raise   # a staged directory where a file now lies: left staged, the next recovery retries
            os.rename(src, dst)
        changed = True
    if changed:
        fsync_dir(top)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(root)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: str, dst: str) -> None:
    """``renameat2(src, dst, RENAME_NOREPLACE)``: raise FileExistsError rather than replace ``dst``.

    Raises OSError ``EINVAL`` (or ``ENOSYS``) where the filesystem or the C
    library does not take the flag.
    """
    libc = _libc()
    func = getattr(libc, "renameat2", None) if libc is not None else None
    if func is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (None where it cannot be)."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]
