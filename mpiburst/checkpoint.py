"""Checkpoint / restart over the tier: keep the last K in the tier, flush one in N, restart from the newest.

SCR's model (``SCR_Start_output`` / ``SCR_Complete_output``, ``SCR_FLUSH``,
halt conditions, restart from the newest complete checkpoint) built only on
what an application could use itself: :class:`mpiburst.File` (or
:func:`mpiburst.open`, :class:`mpiburst.h5.File`) to write, the tier's file
records (the store's ``cut`` and ``drop``, which :func:`mpiburst.residency.ls`
and ``purge`` are built on), :func:`mpiburst.flush.commit` (the
all-or-nothing consistent cut) and :func:`mpiburst.sync`.

Layout under the run's BFS root: checkpoint ``k`` of ``name`` is the
directory ``<name>/ckpt.<k>/``; its files are whatever the application wrote
to :meth:`Saving.path`. A checkpoint is *complete* when its manifest
``<name>/ckpt.<k>/.mpiburst-checkpoint.json`` (step, files and their sizes)
exists; the manifest is written last:

* in the tier, by rank 0, after every rank left the ``save`` block without
  an exception (an ``allgather`` of the outcomes on the object's own
  duplicate of the communicator), so a save that failed on any rank, or a
  job killed during a save, leaves no manifest;
* on the BFS, by the background flush, only after ``commit`` has put every
  data file of the checkpoint on the BFS (fsync'd, renamed into place): the
  manifest is then flushed by its own ``sync`` (written aside, fsync'd,
  renamed). A crash during a flush leaves the BFS without the manifest.

A manifest on the BFS counts only when every file it lists is there with its
size, which also covers a manifest published in the same commit as its data
(the end of ``mpiburst run`` stages out every tier file, manifests included)
by a commit killed half-way through its renames.

The background flush runs in one thread of rank 0, in save order; that
thread is the process's, shared by every ``Checkpoints`` object whose rank 0
the process is, so a flush one object asked for later never reaches the BFS
before one another object asked for earlier. It makes no MPI call at all (so
any thread level works, ``MPI_THREAD_SINGLE`` included: only the main thread
calls MPI), and it touches only the tier and the BFS; the collective calls
(:meth:`Checkpoints.wait`, :meth:`Checkpoints.should_exit`) only ask rank
0's thread how far it is. One flusher means one process's bandwidth to the
BFS; see ``docs/checkpoint.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import flush, halt
from .collective import on_root
from .errors import CheckpointError, ConfigError, MpiburstError, PathError
from .fileobj import open as burst_open
from .paths import resolve
from .store import FileMeta
from .tier import Tier

if TYPE_CHECKING:   # mpi4py is imported only by those who pass a communicator
    from mpi4py import MPI

#: The manifest of a complete checkpoint, in its directory.
MANIFEST = ".mpiburst-checkpoint.json"
#: Manifest format version.
FORMAT = 1
#: Flush rate assumed before the first background flush was measured (bytes per second).
DEFAULT_FLUSH_RATE = 100e6
#: Seconds added to every time-limit margin (start-up of the last flush, scheduling noise).
EXIT_SAFETY = 10.0
#: Seconds between two queries of the batch system's end time.
LIMIT_REFRESH = 60.0

_STEP_DIR = re.compile(r"^ckpt\.(\d+)$")
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the catalog

@dataclass
class Entry:
    """One complete checkpoint: its manifest and where it is complete."""

    step: int
    manifest: dict[str, Any]
    in_tier: bool = False
    on_bfs: bool = False

    @property
    def nbytes(self) -> int:
        """The bytes of its files."""
        return sum(self.manifest["files"].values())

    def where(self) -> str:
        """``tier``, ``bfs`` or ``tier+bfs``."""
        return "+".join(w for w, there in (("tier", self.in_tier), ("bfs", self.on_bfs)) if there)


class Catalog:
    """The checkpoints of one name, in a tier and on the BFS (one process, no MPI).

    Parameters
    ----------
    name
        A directory under the BFS root (``"sim"``), a ``burst://`` URL or an
        absolute path inside the root.
    tier
        The run's tier; None looks at the BFS only (``bfs_root`` then needed).
    """

    def __init__(self, name: str, tier: Tier | None = None, bfs_root: str | None = None) -> None:
        root = tier.bfs_root if tier is not None else bfs_root
        if root is None:
            raise ConfigError("give a tier or a BFS root to find checkpoints in.")
        self.tier = tier
        self.bfs_root = os.path.realpath(root)
        url = name if name.startswith("burst://") or os.path.isabs(name) else f"burst://{name}"
        self.dir = resolve(url, self.bfs_root)
        if self.dir == self.bfs_root:
            raise PathError(f"checkpoint name {name!r} is the BFS root itself; name a directory under it, "
                            "such as 'sim'.")
        self.name = name

    def step_dir(self, step: int) -> str:
        """Return the BFS directory of checkpoint ``step``."""
        return os.path.join(self.dir, f"ckpt.{step}")

    def url(self, step: int, file: str) -> str:
        """Return the ``burst://`` URL of ``file`` of checkpoint ``step``."""
        return "burst://" + os.path.relpath(os.path.join(self.step_dir(step), file), self.bfs_root)

    def tier_files(self, step: int) -> dict[str, int]:
        """Return the tier's files of checkpoint ``step`` (manifest included): name in the checkpoint → size."""
        if self.tier is None:
            return {}
        base = self.step_dir(step)
        return {os.path.relpath(m.path, base): m.size for m in self._tier_records(base)}

    def _tier_records(self, under: str) -> list[FileMeta]:
        """Return the tier's records of the files under directory ``under`` of this catalog, by path.

        One read of the tier (as :func:`mpiburst.residency.ls`) and no BFS
        lookup: the catalog's paths are resolved once, when it is made,
        where ``ls`` would look up every component below the root again (a
        round trip each on a network filesystem). Nor does it join the BFS
        size of a record opened unlooked (:mod:`mpiburst.lookup`), as ``ls``
        would with one more lookup per file: a checkpoint's files are
        written after its BFS copy was removed (:meth:`Checkpoints.save`),
        so there is no BFS size to join, and a flushed file's record is
        looked by its flush.
        """
        assert self.tier is not None
        prefix = under.rstrip("/") + "/"
        return [meta for path, meta in sorted(self.tier.store.cut().items()) if path.startswith(prefix)]

    def scan(self, tier_ok: bool = True) -> dict[int, Entry]:
        """Return every complete checkpoint by step: manifests in the tier, and on the BFS with their files.

        ``tier_ok`` False skips the tier (it is unreachable). A manifest
        that does not parse, or a BFS manifest whose files are missing or of
        another size, is not complete and is left out.
        """
        found: dict[int, Entry] = {}
        if self.tier is not None and tier_ok:
            for meta in self._tier_records(self.dir):
                step = self._manifest_step(meta.path)
                if step is None:
                    continue
                manifest = self._read_tier(step)
                if manifest is not None:
                    found[step] = Entry(step, manifest, in_tier=True)
        for step in self._bfs_steps():
            manifest = self._read_bfs(step)
            if manifest is None or self.bfs_problem(step, manifest) is not None:
                continue
            entry = found.setdefault(step, Entry(step, manifest))
            entry.on_bfs = True
        return dict(sorted(found.items()))

    def bfs_problem(self, step: int, manifest: dict[str, Any]) -> str | None:
        """Return why the BFS copy of ``step`` is not whole (a file missing or of another size), else None."""
        for file, size in manifest["files"].items():
            try:
                got = os.stat(os.path.join(self.step_dir(step), file)).st_size
            except OSError:
                return f"{file} is missing on the BFS"
            if got != size:
                return f"{file} has {got} bytes on the BFS, the manifest says {size}"
        return None

    def problem(self, entry: Entry) -> str | None:
        """Return why checkpoint ``entry`` cannot be read, else None (every file there with its size)."""
        tier_sizes: dict[str, int] = {}
        if entry.in_tier:
            try:
                tier_sizes = self.tier_files(entry.step)
            except MpiburstError as exc:
                return f"the tier cannot be read ({exc})"
        for file, size in entry.manifest["files"].items():
            if file in tier_sizes:
                if tier_sizes[file] != size:
                    return f"{file} has {tier_sizes[file]} bytes in the tier, the manifest says {size}"
                continue
            try:
                got = os.stat(os.path.join(self.step_dir(entry.step), file)).st_size
            except OSError:
                return f"{file} is neither in the tier nor on the BFS"
            if got != size:
                return f"{file} has {got} bytes on the BFS, the manifest says {size}"
        return None

    def write_manifest(self, step: int, manifest: dict[str, Any]) -> None:
        """Write the manifest of ``step`` into the tier: the checkpoint is complete from here on."""
        assert self.tier is not None
        with burst_open(self.url(step, MANIFEST), "wb", tier=self.tier) as f:
            f.write(json.dumps(manifest, sort_keys=True).encode() + b"\n")

    def remove(self, step: int, tier: bool = True, bfs: bool = False) -> None:
        """Remove checkpoint ``step`` from the tier (its BFS files stay) and, with ``bfs``, from the BFS.

        The manifest goes first, so the checkpoint stops being complete
        before any of its data goes. Each file is dropped from the tier as
        ``residency.purge(force=True)`` would, without its BFS lookups.
        """
        base = self.step_dir(step)
        if tier and self.tier is not None:
            files = self.tier_files(step)
            for file in sorted(files, key=lambda f: f != MANIFEST):
                self.tier.store.drop(os.path.join(base, file))
        if bfs and os.path.lexists(base):   # one metadata call when there is nothing (the usual case)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(base, MANIFEST))
            shutil.rmtree(base, ignore_errors=True)

    def _manifest_step(self, path: str) -> int | None:
        parent, base = os.path.split(path)
        m = _STEP_DIR.match(os.path.basename(parent))
        return int(m.group(1)) if m and base == MANIFEST and os.path.dirname(parent) == self.dir else None

    def _bfs_steps(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, names) if m)

    def _read_tier(self, step: int) -> dict[str, Any] | None:
        try:
            with burst_open(self.url(step, MANIFEST), "rb", tier=self.tier) as f:
                return _parse(f.read(), step)
        except OSError:
            return None

    def _read_bfs(self, step: int) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.step_dir(step), MANIFEST), "rb") as f:
                return _parse(f.read(), step)
        except OSError:
            return None


def _parse(raw: bytes, step: int) -> dict[str, Any] | None:
    """Return the manifest in ``raw`` if it is a whole manifest of ``step``, else None."""
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        ok = (manifest["format"] == FORMAT and manifest["step"] == step and isinstance(files, dict)
              and all(isinstance(n, str) and isinstance(s, int) for n, s in files.items()))
    except (ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


# ----------------------------------------------------------------------------- the background flush

@dataclass
class _Flusher:
    """The process's one background thread: the flushes and evictions of every :class:`Checkpoints`, in order.

    One per process, shared by every object whose rank 0 this process is
    (:func:`_process_flusher`): a flush asked for later, by any object, never
    reaches the BFS before one asked for earlier. Each task's error goes to
    its own object's list, so one object's ``wait`` reports only its own.
    """

    tasks: queue.Queue = field(default_factory=queue.Queue)
    flushed_bytes: int = 0
    flush_seconds: float = 0.0
    queued_bytes: int = 0
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def submit(self, task: Callable[[], None], errors: list[str], nbytes: int = 0) -> None:
        """Run ``task`` after every task submitted before it (by any object); its error goes to ``errors``.

        ``nbytes``: what it flushes (for the rate).
        """
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mpiburst-checkpoint-flush", daemon=True)
                self.thread.start()
            self.queued_bytes += nbytes
        self.tasks.put((task, errors, nbytes))

    def join(self) -> None:
        """Wait until every task submitted so far (by any object) is done."""
        self.tasks.join()

    def rate(self) -> float:
        """The measured flush rate in bytes per second (:data:`DEFAULT_FLUSH_RATE` before any was measured)."""
        with self.lock:
            return self.flushed_bytes / self.flush_seconds if self.flush_seconds > 0.05 else DEFAULT_FLUSH_RATE

    def release(self) -> None:
        """One object is done with the thread; the last one ends it, after the tasks already submitted."""
        with self.lock:
            self.users -= 1
            thread = self.thread if self.users == 0 else None
            if thread is not None:
                self.thread = None
                self.tasks.put(None)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                self.tasks.task_done()
                return
            task, errors, nbytes = item
            started = time.monotonic()
            try:
                task()
                with self.lock:
                    if nbytes:
                        self.flushed_bytes += nbytes
                        self.flush_seconds += time.monotonic() - started
            except Exception as exc:   # reported by the next wait(); the checkpoint stays in the tier
                _log.warning("%s", exc)
                with self.lock:
                    errors.append(str(exc))
            finally:
                with self.lock:
                    self.queued_bytes -= nbytes
                self.tasks.task_done()


_shared_flusher = _Flusher()


def _process_flusher() -> _Flusher:
    """Return this process's flusher, counting one more user (each :class:`Checkpoints` releases it once)."""
    with _shared_flusher.lock:
        _shared_flusher.users += 1
    return _shared_flusher


# ----------------------------------------------------------------------------- the API

class Checkpoints:
    """Checkpoints of one name, collective over a communicator (SCR's and VeloC's model; see docs/checkpoint.md).

    Parameters
    ----------
    comm
        An ``mpi4py.MPI.Comm`` (any communicator; it is duplicated), or None
        for a single process. Every method is collective over it.
    name
        A directory under the run's BFS root (``"sim"``): checkpoint ``k``
        is ``<name>/ckpt.<k>/``.
    keep
        How many complete checkpoints the tier keeps; older ones leave the
        tier once their flush, if any, is done (their BFS copies stay).
    flush_every
        The k-th save of this object (counting completed saves from 1) is
        flushed to the BFS when ``k % flush_every == 0``.
    tier
        The run's :class:`~mpiburst.tier.Tier`; default :meth:`Tier.current`.

    Examples
    --------
    >>> ck = mpiburst.Checkpoints(comm, "sim", keep=2, flush_every=4)
    >>> step = ck.latest()
    >>> if step is not None:
    ...     with ck.restore(step) as c:
    ...         f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_RDONLY)
    >>> with ck.save(10) as c:
    ...     f = mpiburst.File.Open(comm, c.path("u.dat"), MPI.MODE_WRONLY | MPI.MODE_CREATE)
    """

    def __init__(self, comm: MPI.Comm | None, name: str, keep: int = 2, flush_every: int = 1, *,
                 tier: Tier | None = None) -> None:
        for what, value in (("keep", keep), ("flush_every", flush_every)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Checkpoints: {what} must be a whole number of at least 1 (got {value!r}).")
        self.comm = comm.Dup() if comm is not None and comm.Get_size() > 1 else comm
        self.tier = tier if tier is not None else Tier.current(self.comm)   # a failed connect fails every rank
        self.catalog = Catalog(name, self.tier)
        self.name, self.keep, self.flush_every = name, keep, flush_every
        #: Completed saves of this object (every rank): the k of ``k % flush_every``.
        self.saves = 0
        self._saved_at: list[float] = []     # when each completed (rank 0), for halt --checkpoints
        self.exit_reason: str | None = None  # why should_exit() said True
        self._flusher = _process_flusher()   # one per process: flushes of every object in the order asked for
        self._errors: list[str] = []         # this object's flush errors since the last wait (rank 0)
        self._released = False
        self._flushing: set[int] = set()     # steps whose flush was asked for (rank 0)
        self._leaving: set[int] = set()      # steps asked to leave the tier (rank 0)
        self._in_tier: set[int] | None = None   # complete in the tier and staying (rank 0; read at the first save)
        self._failed: set[int] = set()       # steps whose restore failed in this run
        self._flush_failed: set[int] = set()   # steps whose flush failed (rank 0's thread): never evicted
        self._halting = False
        self._last_save_seconds = 0.0
        self._newest_bytes = 0
        self._last_check: float | None = None
        self._interval = 0.0
        self._end: float | None = None
        self._end_checked: float | None = None
        self._closed = False

    def __repr__(self) -> str:
        """The active configuration, as SCR prints its own: name, directory, keep, flush_every, ranks, tier."""
        ranks = self.comm.Get_size() if self.comm is not None else 1
        return (f"Checkpoints({self.name!r} in {self.catalog.dir}, keep={self.keep}, flush_every={self.flush_every},"
                f" ranks={ranks}, tier={self.tier.id!r})")

    # -- finding -------------------------------------------------------------------------
    def latest(self) -> int | None:
        """Return the newest complete checkpoint's step, in the tier or on the BFS; None if none (collective)."""
        return on_root(self.comm, lambda: max(self._complete(), default=None))

    def entries(self) -> list[Entry]:
        """Return every complete checkpoint, oldest first (collective)."""
        return on_root(self.comm, lambda: list(self._complete().values()))

    def _complete(self) -> dict[int, Entry]:
        """The complete checkpoints (rank 0): the tier's and the BFS's, less those whose restore failed."""
        try:
            found = self.catalog.scan()
        except MpiburstError as exc:   # the tier is gone: what the BFS holds is still a restart
            warnings.warn(f"the tier cannot be read ({exc}); looking for checkpoints of {self.name} on the "
                          "BFS only.", RuntimeWarning, stacklevel=4)
            found = self.catalog.scan(tier_ok=False)
        return {s: e for s, e in found.items() if s not in self._failed}

    # -- restart -------------------------------------------------------------------------
    def restore(self, step: int | None = None) -> Restoring:
        """Return a context for reading checkpoint ``step`` (default: the newest) (collective).

        If that checkpoint cannot be read (a file missing, or of another
        size than its manifest says), the next older complete one is taken
        instead, with a warning; :attr:`Restoring.step` says which. If the
        block raises, that checkpoint is left out of :meth:`latest` from then
        on, so a loop over ``latest()`` falls back to older ones.

        Raises
        ------
        CheckpointError
            If ``step`` is not a complete checkpoint, or none from it down
            can be read.
        """
        def choose() -> tuple[int, dict[str, Any]]:
            found = self._complete()
            wanted = max(found, default=None) if step is None else step
            if wanted is None or wanted not in found:
                raise CheckpointError(f"there is no complete checkpoint {'' if wanted is None else wanted} of "
                                      f"{self.name}; see 'mpiburst ckpt list {self.name}'.".replace("  ", " "))
            for s in sorted((s for s in found if s <= wanted), reverse=True):
                why = self.catalog.problem(found[s])
                if why is None:
                    return s, found[s].manifest
                warnings.warn(f"checkpoint {s} of {self.name} cannot be read: {why}; trying the next older one.",
                              RuntimeWarning, stacklevel=4)
                self._failed.add(s)
            raise CheckpointError(f"no checkpoint of {self.name} from {wanted} down can be read; see the "
                                  "warnings above.")

        chosen, manifest = on_root(self.comm, choose)
        return Restoring(self, chosen, manifest)

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, output: bool = False) -> Saving:
        """Return a context for writing checkpoint ``step`` (collective).

        The checkpoint is complete only if every rank leaves the block
        without an exception; then its manifest is written and, if it is due
        (see ``flush_every``; always with ``output``, and after
        :meth:`should_exit` said True), its flush is queued in the
        background. A step that exists already is replaced: its old copy is
        removed when the block begins. A failed save removes what it wrote,
        and :meth:`latest` is what it was before it.
        """
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"Checkpoints.save: the step must be a whole number of at least 0 (got {step!r}).")
        self._check_open()
        return Saving(self, step, output)

    def _begin(self, step: int) -> None:
        """Remove what a step holds before it is written again (rank 0)."""
        if step in self._flushing or step in self._leaving:
            self._flusher.join()   # its queued flush would take the new files (errors: for wait())
        if self._in_tier is None:   # once: a retained tier's checkpoints count towards keep
            self._in_tier = {s for s, e in self.catalog.scan().items() if e.in_tier}
        self._flushing.discard(step)
        self._leaving.discard(step)
        self._flush_failed.discard(step)
        self._in_tier.discard(step)
        self.catalog.remove(step, tier=True, bfs=True)

    def _abandon(self, step: int) -> None:
        """Remove what a failed save wrote (rank 0); a failure here only warns: no manifest was written."""
        try:
            self.catalog.remove(step, tier=True, bfs=False)
        except MpiburstError as exc:
            _log.warning("the files of failed checkpoint %d of %s could not be removed: %s", step, self.name, exc)

    def _complete_save(self, step: int, output: bool, seconds: float) -> bool:
        """Write the manifest of ``step``, queue its flush if due and evictions past ``keep`` (rank 0).

        Returns whether the checkpoint is being flushed.
        """
        try:
            files = self.catalog.tier_files(step)
            files.pop(MANIFEST, None)
            if not files:
                raise CheckpointError(f"checkpoint {step} of {self.name} holds no file: write its files to "
                                      f"c.path(name) inside the save block.")
            manifest = {"format": FORMAT, "name": self.name, "step": step, "output": output, "files": files,
                        "ranks": self.comm.Get_size() if self.comm is not None else 1, "saved": time.time(),
                        "save_seconds": round(seconds, 6)}
            self.catalog.write_manifest(step, manifest)
        except Exception:
            self._abandon(step)
            raise
        self._saved_at.append(time.time())
        self._last_save_seconds = seconds
        self._newest_bytes = sum(files.values())
        due = output or self._halting or (self.saves + 1) % self.flush_every == 0   # Saving counts it after
        if due:
            self._queue_flush(step, files)
        assert self._in_tier is not None   # set by _begin
        self._in_tier.add(step)
        for old in sorted(self._in_tier)[:-self.keep]:
            self._in_tier.discard(old)
            self._leaving.add(old)
            self._flusher.submit(functools.partial(self._evict, old), self._errors)
        return due

    def _evict(self, step: int) -> None:
        """Remove checkpoint ``step`` from the tier (the flush thread), unless its flush failed: its only copy."""
        if step in self._flush_failed:
            _log.warning("checkpoint %d of %s stays in the tier: its flush failed", step, self.name)
            return
        self.catalog.remove(step, tier=True)

    def _queue_flush(self, step: int, files: dict[str, int]) -> None:
        """Queue the flush of checkpoint ``step`` (its data files ``files``, name → size): its data all or
        nothing, then its manifest (rank 0).

        Several data files go in one commit; a single one is synced: its
        rename alone is all or nothing, and a commit's journal (written,
        fsync'd, renamed and removed in the BFS root) would add about 10 ms
        on a network filesystem to each flush, the last of which the job
        waits for.
        """
        self._flushing.add(step)
        base = self.catalog.step_dir(step) + os.sep
        manifest = os.path.join(base, MANIFEST)
        data = [os.path.join(base, name) for name in files]

        def task() -> None:
            try:
                if len(data) == 1:
                    with contextlib.suppress(PathError):   # no longer in the tier: as a commit, nothing to do
                        flush.sync(data[0], tier=self.tier)
                else:
                    flush.commit(tier=self.tier, select=lambda p: p.startswith(base) and p != manifest)
                flush.sync(manifest, tier=self.tier)   # only now does the BFS copy count as complete
            except MpiburstError as exc:
                self._flush_failed.add(step)
                raise CheckpointError(f"the flush of checkpoint {step} of {self.name} failed: {exc} It stays in "
                                      "the tier.") from None

        self._flusher.submit(task, self._errors, sum(files.values()))

    def wait(self) -> None:
        """Wait until every flush asked for so far is durable on the BFS (collective).

        Raises
        ------
        CheckpointError
            On every rank, if a background flush failed since the last
            ``wait`` (that checkpoint stays in the tier; later ones went on).
        """
        def check() -> None:
            self._flusher.join()
            self._report()

        on_root(self.comm, check)

    def _report(self) -> None:
        """Raise this object's flush errors since the last report, if any (and forget them)."""
        with self._flusher.lock:
            errors, self._errors[:] = list(self._errors), []
        if errors:
            raise CheckpointError(" ".join(errors))

    def drop(self, step: int, bfs: bool = False) -> None:
        """Remove checkpoint ``step`` from the tier, and with ``bfs`` its BFS copy too (collective)."""
        def act() -> None:
            self._flusher.join()   # its queued flush or eviction first (their errors: for wait())
            self._flush_failed.discard(step)
            if self._in_tier is not None:
                self._in_tier.discard(step)
            self.catalog.remove(step, tier=True, bfs=bfs)
        on_root(self.comm, act)

    # -- halting -------------------------------------------------------------------------
    def should_exit(self) -> bool:
        """Return True on every rank when the job should stop now (collective).

        True when the run's halt file (``mpiburst halt``) says so, or when the
        batch system's time limit is closer than the time the job needs to
        reach the next check and make one more checkpoint durable: the
        interval between two calls, the last save's time, and the bytes of
        one checkpoint plus those still queued at the measured flush rate,
        plus :data:`EXIT_SAFETY`. When it says True the newest checkpoint is
        flushed if it was not (the last checkpoint before a halt reaches the
        BFS), and so is every later save; call :meth:`close` (or
        :meth:`wait`) before exiting.
        """
        def decide() -> str | None:
            reason = self._exit_reason(time.time())
            if reason is not None and not self._halting:
                self._halting = True
                newest = max((s for s, e in self.catalog.scan().items() if e.in_tier), default=None)
                if newest is not None and newest not in self._flushing:
                    entry = self.catalog.scan()[newest]
                    if not entry.on_bfs:
                        self._queue_flush(newest, entry.manifest["files"])
            return reason

        self.exit_reason = on_root(self.comm, decide)
        return self.exit_reason is not None

    def _exit_reason(self, now: float) -> str | None:
        """Why the job should stop now, else None (rank 0)."""
        mono = time.monotonic()
        if self._last_check is not None:
            self._interval = max(self._interval * 0.5, mono - self._last_check)   # slow to forget a long step
        self._last_check = mono
        try:
            condition = halt.read_halt(halt.halt_path(self.tier.conf.dir, self.tier.id))
        except ConfigError as exc:   # a damaged halt file must not end a job that is writing checkpoints
            warnings.warn(f"{exc} It is ignored until then.", RuntimeWarning, stacklevel=4)
            condition = None
        margin = self.margin()
        if condition is not None:
            if condition.immediate:
                return "halt --immediate"
            if condition.checkpoints is not None and \
                    sum(t >= condition.set_at for t in self._saved_at) >= condition.checkpoints:
                return f"halt --checkpoints {condition.checkpoints}"
            if condition.after is not None and now >= condition.after:
                return "halt --after"
            if condition.before is not None and now + margin >= condition.before:
                return f"halt --before (margin {margin:.0f} s)"
        if self._end_checked is None or mono - self._end_checked >= LIMIT_REFRESH:
            self._end, self._end_checked = halt.batch_end_time(), mono
        if self._end is not None:
            left = self._end - now
            need = max(margin, condition.seconds or 0.0) if condition is not None else margin
            if left <= need:
                return f"the job's time limit is {left:.0f} s away (margin {need:.0f} s)"
        return None

    def margin(self) -> float:
        """Seconds the job needs before a deadline to reach its next check and make one more checkpoint durable.

        The interval between two :meth:`should_exit` calls (a step and its
        save; a long one is halved at each later call, not forgotten), the
        last save's time, the bytes of the newest
        checkpoint plus those queued at the measured flush rate, and
        :data:`EXIT_SAFETY` (rank 0's view).
        """
        with self._flusher.lock:
            queued = self._flusher.queued_bytes
        flush_time = (self._newest_bytes + queued) / self._flusher.rate()
        return self._interval + self._last_save_seconds + flush_time + EXIT_SAFETY

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the newest checkpoint if it is not on the BFS, wait for every flush, end the thread (collective).

        Raises
        ------
        CheckpointError
            On every rank, if a flush failed (as :meth:`wait`).
        """
        if self._closed:
            return

        def finish() -> None:
            try:
                known = max(self._in_tier or (), default=None)
                if known is None or known not in self._flushing:   # else the newest is queued: no need to look
                    entries = self.catalog.scan()
                    newest = max((s for s, e in entries.items() if e.in_tier), default=None)
                    if newest is not None and not entries[newest].on_bfs and newest not in self._flushing:
                        self._queue_flush(newest, entries[newest].manifest["files"])
                self._flusher.join()
                self._report()
            finally:
                self._release()

        self._closed = True
        on_root(self.comm, finish)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Close after a clean block; after an exception only end this process's thread (no collective)."""
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Let go of the process's flusher, once (the last object to do so ends its thread)."""
        if not self._released:
            self._released = True
            self._flusher.release()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the checkpoints of {self.name} were closed; make a new Checkpoints object.")


class _Context:
    """What a save or restore block sees: the step and the URLs of its files."""

    def __init__(self, owner: Checkpoints, step: int) -> None:
        self.owner = owner
        self.step = step

    def path(self, file: str) -> str:
        """Return the ``burst://`` URL of ``file`` (a relative name, subdirectories allowed) of this checkpoint."""
        parts = file.split("/")
        if not file or file.startswith("/") or ".." in parts or "" in parts or file == MANIFEST:
            raise PathError(f"{file!r} is not a file name inside a checkpoint; give a relative name such as "
                            f"'u.dat' (not {MANIFEST}).")
        return self.owner.catalog.url(self.step, file)


class Restoring(_Context):
    """The context of :meth:`Checkpoints.restore`: ``path(file)``, ``step``, ``files`` (name → size)."""

    def __init__(self, owner: Checkpoints, step: int, manifest: dict[str, Any]) -> None:
        super().__init__(owner, step)
        self.manifest = manifest
        self.files: dict[str, int] = dict(manifest["files"])
        self.output: bool = manifest.get("output", False)

    def __enter__(self) -> Restoring:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, Exception):
            self.owner._failed.add(self.step)    # latest() leaves it out from now on (no collective here)


class Saving(_Context):
    """The context of :meth:`Checkpoints.save`: ``path(file)``, ``step``; after the block, ``flushing``."""

    def __init__(self, owner: Checkpoints, step: int, output: bool) -> None:
        super().__init__(owner, step)
        self.output = output
        #: Whether the checkpoint's flush was queued (set when the block completed).
        self.flushing = False
        self._started = 0.0

    def __enter__(self) -> Saving:
        owner = self.owner
        self._started = time.monotonic()
        on_root(owner.comm, lambda: owner._begin(self.step))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        owner = self.owner
        if exc_type is not None and not issubclass(exc_type, Exception):
            return False    # an interrupt ends the process: no collective, no manifest
        mine = None if exc_type is None else f"{exc_type.__name__}: {exc}"
        outcomes = owner.comm.allgather(mine) if owner.comm is not None else [mine]
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if failed:
            on_root(owner.comm, lambda: owner._abandon(self.step))
            if exc_type is not None:
                return False
            rank, what = failed[0]
            raise CheckpointError(f"checkpoint {self.step} of {owner.name} was not saved: rank {rank} raised "
                                  f"{what}.")
        seconds = time.monotonic() - self._started
        self.flushing = on_root(owner.comm, lambda: owner._complete_save(self.step, self.output, seconds))
        owner.saves += 1
        return False
