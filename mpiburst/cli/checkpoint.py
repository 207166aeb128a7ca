"""``mpiburst ckpt list|show|drop`` and ``mpiburst halt``: checkpoints and halt conditions from the shell.

``ckpt`` finds the run as the other commands do (``--id`` / ``--dir``, else
``$MPIBURST_CONF``, ...) and looks at the tier and the BFS; with
``--bfs-root DIR`` it looks at the BFS alone, no run needed (after a job).
``halt`` writes the run's halt file (``halt_<id>.json`` in its directory),
which :meth:`mpiburst.Checkpoints.should_exit` reads; the run need not be up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..runconf import find_conf_path, resolve_id
from ..sizes import format_size
from .lifecycle import add_locator


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ckpt`` and ``halt``."""
    p = sub.add_parser("ckpt", help="list, show or drop the checkpoints of a name",
                       description="The checkpoints of a mpiburst.Checkpoints name (a directory under the BFS "
                                   "root): complete ones in the tier and on the BFS.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for action, help in (("list", "list the complete checkpoints, oldest first"),
                         ("show", "show one checkpoint's manifest (default: the newest)"),
                         ("drop", "remove a checkpoint from the tier (and with --bfs from the BFS)")):
        a = actions.add_parser(action, help=help, description=help[0].upper() + help[1:] + ".")
        add_locator(a)
        a.add_argument("--bfs-root", metavar="DIR", help="look at this BFS root only, without a run")
        a.add_argument("name", metavar="NAME", help="the checkpoints' name, e.g. sim")
        if action == "show":
            a.add_argument("step", type=int, nargs="?", metavar="STEP", help="the step (default: the newest)")
            a.add_argument("--json", action="store_true", help="print the manifest as JSON")
        if action == "drop":
            a.add_argument("step", type=int, metavar="STEP", help="the step to drop")
            a.add_argument("--bfs", action="store_true", help="also delete its BFS copy (always with --bfs-root)")
        a.set_defaults(func=_ckpt)

    p = sub.add_parser("halt", help="tell a checkpointing job to stop (Checkpoints.should_exit)",
                       description="Set the run's halt condition; mpiburst.Checkpoints.should_exit() reads it. "
                                   "Each option sets its own part and keeps the others. Without one, print the "
                                   "condition.")
    add_locator(p)
    p.add_argument("--checkpoints", type=int, metavar="N", help="stop after N more checkpoints")
    p.add_argument("--before", metavar="TIME",
                   help="stop early enough that the last checkpoint is durable before TIME "
                        "(HH:MM, ISO date and time, or @seconds-since-epoch)")
    p.add_argument("--after", metavar="TIME", help="stop at the first check after TIME")
    p.add_argument("--seconds", type=float, metavar="S",
                   help="stop when less than S seconds of the batch job's time limit are left")
    p.add_argument("--immediate", action="store_true", help="stop at the next check")
    p.add_argument("--remove", action="store_true", help="remove the halt condition")
    p.set_defaults(func=_halt)


def _catalog(args: argparse.Namespace) -> Any:
    from ..checkpoint import Catalog
    from ..tier import Tier

    if args.bfs_root:
        return Catalog(args.name, bfs_root=os.path.abspath(args.bfs_root))
    try:
        tier = Tier.connect(conf=find_conf_path(args.id, args.dir))
    except ConfigError as exc:
        raise ConfigError(f"{str(exc).rstrip('.')}; or give --bfs-root DIR to look at the BFS alone.") from None
    return Catalog(args.name, tier)


def _ckpt(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    found = catalog.scan()
    if args.action == "list":
        if not found:
            print(f"no complete checkpoint of {args.name} in {catalog.dir}")
        for entry in found.values():
            saved = dt.datetime.fromtimestamp(entry.manifest["saved"]).isoformat(timespec="seconds")
            print(f"{entry.step:>8}  {entry.where():9} {format_size(entry.nbytes):>10}  "
                  f"{len(entry.manifest['files'])} file(s)  {entry.manifest['ranks']} ranks  {saved}"
                  f"{'  output' if entry.manifest.get('output') else ''}")
        return 0
    step = args.step if args.step is not None else max(found, default=None)
    if step not in found:
        raise CheckpointError(f"there is no complete checkpoint {'' if step is None else step} of {args.name} "
                              f"in {catalog.dir}; see 'mpiburst ckpt list {args.name}'.".replace("  ", " "))
    entry = found[step]
    if args.action == "drop":
        catalog.remove(step, tier=True, bfs=args.bfs or args.bfs_root is not None)
        print(f"dropped checkpoint {step} of {args.name}")
        return 0
    if args.json:
        print(json.dumps({**entry.manifest, "where": entry.where()}, indent=1, sort_keys=True))
        return 0
    problem = catalog.problem(entry)
    print(f"checkpoint {step} of {args.name}: {entry.where()}, {format_size(entry.nbytes)}, "
          f"{entry.manifest['ranks']} ranks, saved in {entry.manifest['save_seconds']:.3f} s"
          f"{', output' if entry.manifest.get('output') else ''}; "
          f"{'readable' if problem is None else 'NOT readable: ' + problem}")
    for file, size in sorted(entry.manifest["files"].items()):
        print(f"  {format_size(size):>10}  {catalog.url(step, file)}")
    return 0


def _halt(args: argparse.Namespace) -> int:
    from .. import halt

    run_id = resolve_id(args.id)
    path = halt.halt_path(os.path.abspath(args.dir or os.getcwd()), run_id)
    if args.remove:
        print(f"halt condition of run {run_id} removed" if halt.remove_halt(path) else
              f"run {run_id} had no halt condition")
        return 0
    changes: dict[str, Any] = {}
    if args.checkpoints is not None:
        if args.checkpoints < 0:
            raise CheckpointError(f"--checkpoints must be 0 or more (got {args.checkpoints}).")
        changes["checkpoints"] = args.checkpoints
    for option in ("before", "after"):
        if getattr(args, option) is not None:
            changes[option] = halt.parse_time(getattr(args, option))
    if args.seconds is not None:
        changes["seconds"] = args.seconds
    if args.immediate:
        changes["immediate"] = True
    condition = halt.set_halt(path, **changes) if changes else halt.read_halt(path)
    print(f"halt condition of run {run_id}: {condition.describe() if condition else 'none'}")
    return 0
