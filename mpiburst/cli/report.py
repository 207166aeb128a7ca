"""``mpiburst report``: a run's I/O report (terminal summary, ``--json``, ``--html``)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import ConfigError
from ..runconf import find_conf_path
from .lifecycle import add_locator


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    p = sub.add_parser("report", help="show what the job wrote through mpiburst and what reached the BFS",
                       description="Report a run's I/O (live, or finished: a stopped run's statistics are saved beside its "
                       "files): per file, the "
                       "application's writes and reads through mpiburst (calls, bytes, access sizes, patterns, "
                       "time) against the flush's writes to the BFS. Counters reach the tier when files are "
                       "closed.")
    add_locator(p)
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with plots to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print no summary")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from .. import iostats, report, server
    from ..runconf import RunConf
    from ..tier import Tier

    path = find_conf_path(args.id, args.dir)
    directory, name = os.path.split(path)
    run_id = name.removeprefix("mpiburst_").removesuffix(".conf")
    data = None
    if os.path.exists(path):
        conf = RunConf.load(path)
        if server.pid_alive(conf.pid, conf.server):
            tier = Tier.connect(conf=conf)
            try:
                data = report.build(tier.store, run=conf.id)
            finally:
                tier.disconnect()
    if data is None:  # the server is gone: what it saved when it stopped
        saved = iostats.stats_path(directory, run_id)
        if not os.path.exists(saved):
            raise ConfigError(f"run {run_id} is not running and left no statistics ({saved}); check --id and --dir.")
        data = report.from_stats(iostats.load_stats(saved), run=run_id)
    if args.json:
        _write(args.json, json.dumps(data, indent=1) + "\n")
    if args.html:
        _write(args.html, report.html(data))
    if not args.quiet:
        print(report.summary(data))
    return 0


def _write(path: str, text: Any) -> None:
    """Write ``text`` to ``path`` through a temporary name (a reader never sees half a report)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)
