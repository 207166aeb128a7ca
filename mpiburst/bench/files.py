"""The files pattern: many small files, one writer each, as mdtest measures them (file-per-process output).

Each rank makes ``F`` files (``--files``) of ``S`` bytes (each ``--transfer``
size is one file size) in its own directory, and the same in two ways,
interleaved in every repeat (taking turns at going first):

* ``direct``: plain POSIX on the BFS: ``open(O_CREAT)``, ``write``,
  ``fsync``, ``close`` per file, then one ``fsync`` of the directory: the
  files are durable when the phase ends;
* ``tier``: through mpiburst: ``File.Open`` on ``COMM_SELF``, ``Write_at``,
  ``Close`` per file (what the application waits for), then one commit of
  the run's directory: the files are durable when it returns.

and, as the floor of the tier's commit, its BFS work alone:

* ``floor``: each rank writes the same files raw, in as many threads as a
  commit uses (``MPIBURST_COMMIT_THREADS``), each ``open(O_CREAT)``,
  ``write``, ``fsync``, ``close`` under its final name in a hidden staging
  directory; then its directory is fsync'd and rank 0 fsyncs the staging
  directory, renames it into place and fsyncs the parent, as a commit
  publishes a new directory (:mod:`mpiburst.flush.newdirs`), with no tier
  read and no bookkeeping. The tier's create phase plus this is how soon
  every file could be durable through the tier on this BFS;

and, as the floor of the tier's create phase, the server's part alone:

* ``floor_create``: each rank ``SET`` s each file's bytes into the tier's
  server with plain redis-py, one command and one round trip per file, in
  the same loop as the create phase (no file, record, index or counters;
  the keys removed afterwards, untimed). A create through the tier cannot
  take fewer round trips.

Then, on the direct and tier ways' files: ``stat`` of every file (``os.stat``; through the
tier :func:`mpiburst.residency.stat`'s record lookup, the tier's answer to a
stat), a read-back of every file (``open``, ``read``, ``close``; through the
tier ``File.Open`` read-only, ``Read_at``, ``Close``) checked byte for byte
on the first repeat, and the removal of every file (``unlink``; through the
tier ``mpiburst.File.Delete``, which removes the tier's data and the BFS
file). Every phase is timed on all ranks at once (slowest rank); the rates
are files per second over all ranks.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..flush.writes import fsync_dir
from ..sizes import format_size
from .baselines import agree, raw_keys, tier_clear
from .burst import URL_DIR
from .timing import collective_time

#: Files each rank makes per measurement unless ``--files`` says otherwise.
DEFAULT_FILES = 200
#: File sizes measured when only the files pattern runs and no ``--transfer`` is given.
DEFAULT_SIZES = ("4k", "64k")
#: The phases of each way, in the order they run.
PHASES = ("create", "durable", "stat", "read", "remove")
#: The two ways.
WAYS = ("direct", "tier")


@dataclass(frozen=True)
class Files:
    """One rank's share of a files measurement: ``count`` files of ``size`` bytes."""

    size: int
    count: int
    nranks: int
    rank: int

    def name(self, i: int) -> str:
        """Return the name of this rank's file ``i``."""
        return f"f{self.rank}.{i}"

    def contents(self) -> list[np.ndarray]:
        """Return the bytes of each of this rank's files (built before timing; each file's own)."""
        base = np.random.default_rng(1 + self.rank).integers(0, 256, self.size + 8, dtype=np.uint8)
        out = []
        for i in range(self.count):
            data = base[i % 8:i % 8 + self.size].copy()
            stamp = np.frombuffer(np.array([self.rank, i], dtype=np.uint32).tobytes(), dtype=np.uint8)
            data[:min(8, self.size)] = stamp[:min(8, self.size)]   # a file swapped with another is caught
            out.append(data)
        return out


def _direct(comm: Any, cfg: Files, directory: str, contents: Sequence[np.ndarray], check: bool
            ) -> tuple[dict[str, float], bool]:
    """Time the four phases with plain POSIX calls in ``directory`` (this rank's own); return seconds, verdict."""
    paths = [os.path.join(directory, cfg.name(i)) for i in range(cfg.count)]

    def create() -> None:
        for path, data in zip(paths, contents):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data.data)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)

    def read() -> list[bytes]:
        got = []
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                got.append(f.read())
        return got

    secs: dict[str, float] = {}
    secs["create"], _ = collective_time(comm, create)
    secs["durable"] = secs["create"]   # every file was fsync'd, and its directory
    secs["stat"], _ = collective_time(comm, lambda: [os.stat(p) for p in paths])
    secs["read"], got = collective_time(comm, read)
    ok = all(g == d.tobytes() for g, d in zip(got, contents)) if check else True
    def remove() -> None:
        for path in paths:
            os.unlink(path)

    secs["remove"], _ = collective_time(comm, remove)
    return secs, agree(comm, ok)


def _floor(comm: Any, cfg: Files, parent: str, sub: str, contents: Sequence[np.ndarray]) -> float:
    """Time the commit's BFS work alone into ``parent/sub`` (see the module docstring); return the seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from ..flush.many import threads

    stage = os.path.join(parent, f".{sub}.stage")
    mine = os.path.join(stage, str(cfg.rank))
    paths = [os.path.join(mine, cfg.name(i)) for i in range(cfg.count)]

    def one(item: tuple[str, np.ndarray]) -> None:
        fd = os.open(item[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, item[1].data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def publish() -> None:
        if cfg.rank == 0:   # the commit's rank 0 makes the staging directories
            os.makedirs(parent, exist_ok=True)
            os.mkdir(stage)
            for r in range(cfg.nranks):
                os.mkdir(os.path.join(stage, str(r)))
        comm.Barrier()
        with ThreadPoolExecutor(threads()) as pool:
            list(pool.map(one, zip(paths, contents)))
        fsync_dir(mine)
        comm.Barrier()
        if cfg.rank == 0:
            fsync_dir(stage)
            os.rename(stage, os.path.join(parent, sub))
            fsync_dir(parent)
        comm.Barrier()

    seconds, _ = collective_time(comm, publish)
    if cfg.rank == 0:
        shutil.rmtree(os.path.join(parent, sub))
    return seconds


def _commit(comm: Any, tier: Any, directory: str) -> None:
    """Make every file under ``directory`` durable: one collective commit of the tier's files there."""
    from .. import flush

    prefix = directory.rstrip("/") + "/"
    flush.commit(tier=tier, select=lambda p: p.startswith(prefix), comm=comm)


def _tier(comm: Any, tier: Any, cfg: Files, sub: str, contents: Sequence[np.ndarray], check: bool
          ) -> tuple[dict[str, float], bool]:
    """Time the four phases through mpiburst under ``burst://bench/<sub>/<rank>``; return seconds and the verdict.

    The commit takes every rank's files of ``burst://bench/<sub>`` at once.
    """
    from mpi4py import MPI

    import mpiburst

    from .. import residency

    urls = [f"burst://{URL_DIR}/{sub}/{cfg.rank}/{cfg.name(i)}" for i in range(cfg.count)]

    def create() -> None:
        for url, data in zip(urls, contents):
            f = mpiburst.File.Open(MPI.COMM_SELF, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
            f.Write_at(0, data)
            f.Close()

    def read() -> list[bytes]:
        got = []
        for url in urls:
            f = mpiburst.File.Open(MPI.COMM_SELF, url, MPI.MODE_RDONLY)
            buf = bytearray(cfg.size)
            f.Read_at(0, buf)
            f.Close()
            got.append(bytes(buf))
        return got

    secs: dict[str, float] = {}
    secs["create"], _ = collective_time(comm, create)
    commit, _ = collective_time(comm, lambda: _commit(comm, tier, os.path.join(tier.bfs_root, URL_DIR, sub)))
    secs["durable"] = secs["create"] + commit
    secs["stat"], _ = collective_time(comm, lambda: [residency.stat(u, tier=tier) for u in urls])
    secs["read"], got = collective_time(comm, read)
    ok = all(g == d.tobytes() for g, d in zip(got, contents)) if check else True
    if check:   # the committed BFS files hold the same bytes
        for url, data in zip(urls, contents):
            with open(os.path.join(tier.bfs_root, url[len("burst://"):]), "rb") as f:
                ok = ok and f.read() == data.tobytes()
    def remove() -> None:
        for url in urls:
            mpiburst.File.Delete(url)

    secs["remove"], _ = collective_time(comm, remove)
    ok = ok and not any(os.path.exists(os.path.join(tier.bfs_root, u[len("burst://"):])) for u in urls)
    return secs, agree(comm, ok)


def _create_floor(comm: Any, tier: Any, client: Any, cfg: Files, contents: Sequence[np.ndarray]) -> float:
    """Return the seconds for every rank to ``SET`` each file's bytes into the tier's server, one round trip each."""
    keys = raw_keys(tier, "bench-files-raw", cfg.rank, cfg.count)

    def create() -> None:
        for key, data in zip(keys, contents):
            client.set(key, data.data)

    seconds, _ = collective_time(comm, create)
    tier_clear(client, keys)
    return seconds


def run_config(comm: Any, tier: Any, cfg: Files, repeat: int, scratch: str, client: Any = None) -> dict[str, Any]:
    """Measure both ways on ``cfg`` ``repeat`` times; return the raw figures (collective).

    ``client``: a plain redis-py client of this rank's server (the create's floor); None: not measured.
    """
    contents = cfg.contents()
    seconds: dict[str, list[float]] = {f"{w}_{p}": [] for w in WAYS for p in PHASES}
    verified = {w: True for w in WAYS}
    floor: list[float] = []
    floor_create: list[float] = []
    order = (*WAYS, "floor")
    for i in range(repeat):
        sub = f"files-{cfg.size}-{i}"
        for way in order[i % 3:] + order[:i % 3]:   # each goes first in turn
            if way == "floor":
                floor.append(_floor(comm, cfg, os.path.join(scratch, "floor"), sub, contents))
                if client is not None:
                    floor_create.append(_create_floor(comm, tier, client, cfg, contents))
                continue
            if way == "direct":
                directory = os.path.join(scratch, "direct", sub, str(cfg.rank))
                os.makedirs(directory, exist_ok=True)
                secs, ok = _direct(comm, cfg, directory, contents, i == 0)
            else:
                secs, ok = _tier(comm, tier, cfg, sub, contents, i == 0)
            for phase, s in secs.items():
                seconds[f"{way}_{phase}"].append(s)
            verified[way] = verified[way] and ok
    return {"pattern": "files", "transfer": cfg.size, "ranks": cfg.nranks, "files_per_rank": cfg.count,
            "bytes_per_rank": cfg.size * cfg.count, "total_bytes": cfg.size * cfg.count * cfg.nranks,
            "seconds": seconds, "verified": verified, "floor_commit": floor, "floor_create": floor_create}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON record: per way and phase the seconds (median, min, max) and files/s, and the ratios."""
    nfiles = raw["files_per_rank"] * raw["ranks"]
    methods = {}
    for key, values in raw["seconds"].items():
        med = statistics.median(values)
        methods[key] = {"seconds": {"median": med, "min": min(values), "max": max(values)},
                        "files_per_second": nfiles / med if med > 0 else float("inf"),
                        "verified": raw["verified"][key.split("_")[0]]}
    med = {key: m["seconds"]["median"] for key, m in methods.items()}
    ratios = {f"{p}_time_vs_direct": med[f"tier_{p}"] / med[f"direct_{p}"] for p in PHASES}
    keys = ("pattern", "transfer", "ranks", "files_per_rank", "bytes_per_rank", "total_bytes")
    out = {k: raw[k] for k in keys} | {"methods": methods, "ratios": ratios}
    if raw.get("floor_commit"):   # the commit's BFS work alone; with the tier's create, the durable floor
        commit = raw["floor_commit"]
        durable = med["tier_create"] + statistics.median(commit)
        out["floor"] = {"commit_seconds": {"median": statistics.median(commit), "min": min(commit),
                                           "max": max(commit)},
                        "durable_seconds": durable, "durable_time_vs_direct": durable / med["direct_durable"]}
    if raw.get("floor_create"):   # the server's part of the create alone: one SET per file
        create = raw["floor_create"]
        out.setdefault("floor", {})["create_seconds"] = {"median": statistics.median(create), "min": min(create),
                                                          "max": max(create)}
        out["floor"]["create_time_vs_direct"] = statistics.median(create) / med["direct_create"]
    return out


def targets(results: Sequence[dict[str, Any]], network: bool) -> list[tuple[str, bool | None]]:
    """Return (description with the figure, met) for the issue's small-file targets, judged at 64 KiB files.

    Application-visible create+write+close at most 0.10 of direct on a
    network filesystem (1.0 on a local one), and the time until every file
    is durable at most direct's on a network filesystem.
    """
    out: list[tuple[str, bool | None]] = []
    for r in results:
        where = f"files {format_size(r['transfer'])} x {r['files_per_rank']}/rank"
        judged = r["transfer"] == 64 << 10
        ra = r["ratios"]
        limit = 0.1 if network else 1.0
        out.append((f"{where}: create+write+close / direct = {ra['create_time_vs_direct']:.2f} (<= {limit:.2f})",
                    ra["create_time_vs_direct"] <= limit if judged else None))
        durable = ra["durable_time_vs_direct"]
        out.append((f"{where}: time until all durable / direct = {durable:.2f} (<= 1.00)",
                    durable <= 1.0 if judged and network else None))
    return out


HEADER = ["files", "size", "create d", "create t", "t/d", "cfl/d", "durable d s", "durable t s", "t/d", "floor s", "fl/d",
          "stat d", "stat t", "read d", "read t", "remove d", "remove t"]


def cells(r: dict[str, Any]) -> list[str]:
    """Return the table cells of one files measurement (rates in files/s, durable in seconds)."""
    m, ra, floor = r["methods"], r["ratios"], r.get("floor")

    def rate(key: str) -> str:
        return f"{m[key]['files_per_second']:.0f}" + ("" if m[key]["verified"] else "!")

    return [f"{r['files_per_rank']}/rank", format_size(r["transfer"]), rate("direct_create"), rate("tier_create"),
            f"{ra['create_time_vs_direct']:.2f}",
            f"{floor['create_time_vs_direct']:.2f}" if floor and "create_time_vs_direct" in floor else "-",
            f"{m['direct_durable']['seconds']['median']:.3f}",
            f"{m['tier_durable']['seconds']['median']:.3f}", f"{ra['durable_time_vs_direct']:.2f}",
            f"{floor['durable_seconds']:.3f}" if floor and "durable_seconds" in floor else "-",
            f"{floor['durable_time_vs_direct']:.2f}" if floor and "durable_seconds" in floor else "-", rate("direct_stat"), rate("tier_stat"), rate("direct_read"), rate("tier_read"),
            rate("direct_remove"), rate("tier_remove")]


LEGEND = """\
files pattern (mdtest-like): each of {ranks} ranks makes its own files; files/s over all ranks, median of {repeat}.
d = direct POSIX (open, write, fsync, close; the directory fsync'd once); t = through the tier (File.Open on
COMM_SELF, Write_at, Close). durable = seconds until every file is durable on the BFS (direct: the create phase;
tier: create, then one commit of the directory). floor = the tier's create, then the commit's BFS work alone
(the same files written, fsync'd and closed raw in as many threads as a commit, in a staging directory published
by one rename); fl/d = floor over direct. cfl/d = the create's floor over direct: one plain SET of each file's
bytes into the tier's server per file, no file, record or index. stat: os.stat / mpiburst.residency.stat; read: open, read,
close / File.Open, Read_at, Close; remove: unlink / mpiburst.File.Delete (tier data and BFS file).
t/d = time through the tier over direct. '!' = wrong bytes read back or on the BFS."""


def panel(ax: Any, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Draw files/s against file size on ``ax``: a line per way and phase, direct dashed; return legend handles."""
    xs = [r["transfer"] for r in rows]
    handles = {}
    for i, phase in enumerate(PHASES):
        for way in WAYS:
            nfiles = [r["files_per_rank"] * r["ranks"] for r in rows]
            secs = [r["methods"][f"{way}_{phase}"]["seconds"] for r in rows]
            med = [n / s["median"] for n, s in zip(nfiles, secs)]
            err = [[m - n / s["max"] for m, n, s in zip(med, nfiles, secs)],
                   [n / s["min"] - m for m, n, s in zip(med, nfiles, secs)]]
            label = f"files: {phase}, {'direct POSIX' if way == 'direct' else 'through the tier'}"
            handles[label] = ax.errorbar(xs, med, yerr=err, label=label, linestyle="--" if way == "direct" else "-",
                                         marker="o", capsize=3, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("file size (bytes)")
    ax.set_ylabel("files/s over all ranks, median with min-max")
    ax.grid(True, which="both", alpha=0.3)
    return handles
