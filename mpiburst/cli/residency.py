"""``mpiburst sync / purge / pin / unpin / prestage / frag-stat / ls / stat / cat / rm``: data residency from the shell.

Every command finds the run as ``mpiburst status`` does (``--id``/``--dir``,
else ``$MPIBURST_CONF``, else the ID rules in the current directory) and takes
paths as ``burst://`` URLs or BFS paths inside the run's root. A command over
several files goes on after a file fails, reports each failure on one line
and exits with the first failure's code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..errors import MpiburstError
from ..runconf import find_conf_path
from ..sizes import format_size
from .lifecycle import add_locator


def register(sub: argparse._SubParsersAction) -> None:
    """Add the residency sub-commands."""
    p = _parser(sub, "sync", "write tier data to the backing filesystem",
                "Write the dirty data of files to the BFS as large aligned writes. Non-blocking by default "
                "(the run's engine does it); -b waits and reports.")
    p.add_argument("-b", "--block", action="store_true", help="sync now and wait for the end")
    p.add_argument("-V", "--verbose", action="store_true",
                   help="with -b: show progress (bytes, rate, time left), verify, and print bytes and SHA-256 per file")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="threads writing each file (default 2)")
    _paths(p)
    p.set_defaults(func=_sync)

    p = _parser(sub, "purge", "drop files' data from the tier",
                "Drop files' data from the tier (reads then come from the BFS). Without -k data not yet on the "
                "BFS is lost: asked on a terminal, refused elsewhere unless --force.")
    p.add_argument("-k", "--clean-only", action="store_true", help="drop only data the BFS holds (keep dirty data)")
    p.add_argument("--force", action="store_true", help="drop dirty data too without asking (it is lost)")
    _paths(p)
    p.set_defaults(func=_purge)

    p = _parser(sub, "pin", "exempt files from automatic sync and purge", "Exempt files from the engine's "
                "automatic sync and purge (explicit sync and purge still work).")
    _paths(p)
    p.set_defaults(func=lambda a: _each(a, lambda path, t: _residency().pin(path, tier=t)))
    p = _parser(sub, "unpin", "make files subject to automatic sync and purge again",
                "Undo pin: the engine may sync and purge the files again.")
    _paths(p)
    p.set_defaults(func=lambda a: _each(a, lambda path, t: _residency().unpin(path, tier=t)))

    p = _parser(sub, "prestage", "copy BFS files into the tier for jobs that read them",
                "Copy BFS files into the tier as clean data (writes always win over it). Non-blocking by default.")
    p.add_argument("-b", "--block", action="store_true", help="copy now and wait for the end")
    p.add_argument("-K", "--keep", action="store_true", help="keep clean data already in the tier; copy the rest")
    p.add_argument("-V", "--verbose", action="store_true", help="with -b: show progress (bytes, rate, time left)")
    _paths(p, source="bfs")
    p.set_defaults(func=_prestage)

    p = _parser(sub, "frag-stat", "show files' bytes per state: dirty, pending, clean, deletable",
                "Show the bytes of files in the tier per state: dirty (only in the tier), pending (being synced), "
                "clean (also on the BFS), deletable (superseded by newer writes).")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    _paths(p)
    p.set_defaults(func=_frag_stat)

    p = _parser(sub, "ls", "list the tier's files", "List the files the tier holds, with size and state.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="directories or files to list (default: all)")
    p.set_defaults(func=_ls)

    p = _parser(sub, "stat", "show what the tier knows of files", "Show a tier file's record: size, "
                "sequence numbers, state, pin, bytes per state, BFS size.")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    _paths(p)
    p.set_defaults(func=_stat)

    p = _parser(sub, "cat", "print tier files' current bytes", "Write the current bytes of tier files (newest "
                "writes over the BFS copy) to standard output.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="burst:// URLs or BFS paths")
    p.set_defaults(func=_cat, recursive=False)

    p = _parser(sub, "rm", "remove files from the tier and the BFS", "Remove files: their data in the tier "
                "and their BFS files; with -r, a directory: every tier file under it and the BFS directory tree.")
    _paths(p)
    p.set_defaults(func=_rm)


def _parser(sub: argparse._SubParsersAction, name: str, help: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description)
    add_locator(p)
    return p


def _paths(p: argparse.ArgumentParser, source: str = "tier") -> None:
    p.add_argument("-r", "--recursive", action="store_true", help="act on the files under directories")
    p.add_argument("paths", nargs="+", metavar="PATH", help="burst:// URLs or BFS paths inside the run's root")
    p.set_defaults(source=source)


def _residency() -> Any:
    from .. import residency

    return residency


def _connect(args: argparse.Namespace) -> Any:
    """Return the Tier of the run named by ``--id`` / ``--dir`` / the environment."""
    from ..tier import Tier

    return Tier.connect(conf=find_conf_path(args.id, args.dir))


def _each(args: argparse.Namespace, action: Callable[[str, Any], Any]) -> int:
    """Apply ``action(path, tier)`` to every file named; report failures one line each; return the status."""
    tier = _connect(args)
    files = _residency().expand(args.paths, recursive=args.recursive, tier=tier, source=args.source)
    status = 0
    for path in files:
        try:
            action(path, tier)
        except MpiburstError as exc:
            print(f"mpiburst {args.command}: {exc}", file=sys.stderr)
            status = status or exc.exit_code
    return status


def _sync(args: argparse.Namespace) -> int:
    from .. import flush

    if args.workers < 1:
        raise MpiburstError(f"--workers must be at least 1 (got {args.workers}).")
    if not args.block:
        tier = _connect(args)
        status = _each(args, lambda path, t: flush.sync(path, tier=t, block=False))
        if not _engine_alive(tier):
            print(f"mpiburst sync: warning: no engine runs for run {tier.id}; the requests wait in its queue "
                  f"(use -b to sync now).", file=sys.stderr)
        return status

    def one(path: str, tier: Any) -> None:
        meter = _meter(tier, "sync", path) if args.verbose else None
        rep = flush.sync(path, tier=tier, verify=args.verbose, workers=args.workers,
                         progress=meter.update if meter else None)
        if meter is not None:
            meter.finish()
        if args.verbose:
            rate = rep.bytes / rep.seconds if rep.seconds > 0 else 0.0
            print(f"{rep.path}: {rep.size} bytes, {rep.bytes} written in {rep.writes} writes, "
                  f"{format_size(int(rate))}/s, sha256 {rep.checksum}")

    return _each(args, one)


def _meter(tier: Any, what: str, path: str) -> Any:
    """Return a progress meter on stderr for syncing (total: the file's dirty batches) or prestaging ``path``."""
    import os

    from .. import iostats
    from ..progress import Meter

    if what == "sync":
        meta = tier.store.meta(path)
        total = iostats.dirty_bytes(tier.store, [meta]) if meta is not None and meta.dirty else 0
    else:
        total = os.path.getsize(path)
    return Meter(f"{what} {path}", total=total or None)


def _engine_alive(tier: Any) -> bool:
    from ..server import engine_alive

    return engine_alive(tier.conf.engine_pid, tier.conf.dir)


def _purge(args: argparse.Namespace) -> int:
    res = _residency()

    def one(path: str, tier: Any) -> None:
        force = args.force
        if not args.clean_only and not force and sys.stdin.isatty():
            meta = tier.store.meta(path)
            if meta is not None and meta.dirty:
                answer = input(f"{path} holds data not yet on the BFS; purge it and lose that data? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print(f"mpiburst purge: {path} kept.", file=sys.stderr)
                    return
                force = True
        freed = res.purge(path, clean_only=args.clean_only, force=force, tier=tier)
        print(f"{path}: {format_size(freed)} freed")

    return _each(args, one)


def _prestage(args: argparse.Namespace) -> int:
    res = _residency()

    def one(path: str, tier: Any) -> None:
        meter = _meter(tier, "prestage", path) if args.verbose and args.block else None
        n = res.prestage(path, keep=args.keep, block=args.block, tier=tier, progress=meter.update if meter else None)
        if meter is not None:
            meter.finish()
        if n is not None:
            print(f"{path}: {format_size(n)} staged")

    return _each(args, one)


def _frag_stat(args: argparse.Namespace) -> int:
    res = _residency()
    if not args.json:
        print(f"{'dirty':>10} {'pending':>10} {'clean':>10} {'deletable':>10}  path")

    def one(path: str, tier: Any) -> None:
        fs = res.frag_stat(path, tier=tier)
        if args.json:
            print(json.dumps(dict(path=path, **fs.as_dict()), sort_keys=True))
        else:
            print(f"{fs.dirty:>10} {fs.pending:>10} {fs.clean:>10} {fs.deletable:>10}  {path}")

    return _each(args, one)


def _ls(args: argparse.Namespace) -> int:
    tier = _connect(args)
    metas = []
    for path in args.paths or [None]:
        metas.extend(_residency().ls(path, tier=tier))
    for m in metas:
        state = ("dirty" if m.dirty else "clean") + (",pinned" if m.pinned else "")
        print(f"{m.size:>14} {state:<14} {m.path}")
    if args.paths and not metas:
        raise MpiburstError(f"the tier holds no files at or under {' '.join(args.paths)}.")
    return 0


def _rm(args: argparse.Namespace) -> int:
    """Remove files; with -r, a directory is removed whole (tier files under it and the BFS tree)."""
    if not args.recursive:
        return _each(args, lambda path, t: _residency().rm(path, tier=t))
    res = _residency()
    tier = _connect(args)
    status = 0
    for path in args.paths:
        try:
            if res.is_dir(path, tier=tier):
                res.rmtree(path, tier=tier)
            else:
                res.rm(path, tier=tier)
        except MpiburstError as exc:
            print(f"mpiburst rm: {exc}", file=sys.stderr)
            status = status or exc.exit_code
    return status


def _stat(args: argparse.Namespace) -> int:
    res = _residency()

    def one(path: str, tier: Any) -> None:
        info = res.stat(path, tier=tier)
        if args.json:
            print(json.dumps(info, sort_keys=True))
        else:
            for key, value in info.items():
                print(f"{key:<10} {value}")

    return _each(args, one)


def _cat(args: argparse.Namespace) -> int:
    res = _residency()
    out = sys.stdout.buffer

    def one(path: str, tier: Any) -> None:
        for chunk in res.read(path, tier=tier):
            out.write(chunk)
        out.flush()

    args.source = "tier"
    return _each(args, one)
