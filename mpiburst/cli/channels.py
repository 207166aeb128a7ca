"""``mpiburst store`` / ``retrieve`` / ``channel-status`` / ``channel-reset``: mem_io's channel workflow.

The run is found like ``mpiburst status`` finds it (``--id``/``--dir``, else
``$MPIBURST_CONF``, else the ID rules in the current directory). Exit codes
follow mem_io: 21 channel out of range, 24 channel open, 51 authentication.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .. import channels
from ..errors import PathError
from ..tier import Tier
from .lifecycle import add_locator


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``store``, ``retrieve``, ``channel-status`` and ``channel-reset`` sub-commands."""
    p = sub.add_parser("store", help="append stdin or a file to a channel",
                       description="Append FILE (or stdin, '-') to channel C of the run. One writer per "
                                   "channel at a time (exit 24 if it is open); 0 <= C < channels (else exit 21).")
    add_locator(p)
    p.add_argument("--channel", "-c", type=int, required=True, metavar="C", help="channel number")
    p.add_argument("file", nargs="?", default="-", metavar="FILE|-", help="input (default: stdin)")
    p.set_defaults(func=_store)

    p = sub.add_parser("retrieve", help="write the channels to stdout or to one file each",
                       description="Write every channel in order to stdout, a newline after each non-empty "
                                   "one; or one channel; or, with --split, data_<id>_<C>.dat per channel.")
    add_locator(p)
    p.add_argument("--channel", "-c", type=int, metavar="C", help="only this channel")
    p.add_argument("--split", action="store_true", help="one file per channel, data_<id>_<C>.dat, no newline added")
    p.add_argument("--output-dir", default=".", metavar="DIR", help="where --split writes (default: .)")
    p.add_argument("--print-id", action="store_true", help="prefix each channel with its number and SEP")
    p.add_argument("--sep", default=" ", metavar="S", help="separator after the channel number (default: space)")
    p.set_defaults(func=_retrieve)

    p = sub.add_parser("channel-status", help="count closed, open and unused channels",
                       description="Show how many channels are closed, open and unused; --details adds each "
                                   "channel's state and bytes.")
    add_locator(p)
    p.add_argument("--details", action="store_true", help="one line per channel")
    p.set_defaults(func=_status)

    p = sub.add_parser("channel-reset", help="close channels left open by crashed writers",
                       description="Close channels left open by writers that crashed; their data is kept.")
    add_locator(p)
    p.add_argument("--channel", "-c", type=int, metavar="C", help="only this channel (default: all)")
    p.set_defaults(func=_reset)




def warner(command: str) -> Callable[[str], None]:
    """Return a function printing ``<command>: warning: <message>`` on stderr."""
    return lambda message: print(f"{command}: warning: {message}", file=sys.stderr)


def do_store(tier: Tier, channel: int, source: str) -> int:
    """Store ``source`` (a path or ``-`` for stdin) to ``channel``; shared with ``mem_io_store``.

    Returns once the data is on its node and, with replicas, on its replica too.
    """
    if source == "-":
        status = channels.store(tier, channel, sys.stdin.buffer)
    else:
        try:
            with open(source, "rb") as f:
                status = channels.store(tier, channel, f)
        except FileNotFoundError:
            raise PathError(f"input file {source} does not exist; give an existing file or '-' for stdin.") from None
    tier.store.confirm()
    return status


def do_retrieve(tier: Tier, channel: int | None, split: bool, print_id: bool, sep: str, directory: str,
                command: str) -> int:
    """Retrieve channels to stdout or split files; shared with ``mem_io_retrieve``."""
    warn = warner(command)
    if split:
        if channel is not None:
            channels.check(tier, channel)
            print(f"{command}: --split writes every channel; the channel option is ignored.", file=sys.stderr)
        channels.split(tier, os.path.abspath(directory), warn=warn)
    else:
        channels.retrieve(tier, sys.stdout.buffer, channel=channel, print_id=print_id, sep=sep, warn=warn)
    return 0


def print_status(tier: Tier, details: bool) -> int:
    """Print channel counts (and per-channel lines); shared with ``mem_io_status``."""
    states = channels.info(tier)
    counts = {s: sum(c.state == s for c in states) for s in ("closed", "open", "unused")}
    print(f"run {tier.id}: {tier.channels} channels: {counts['closed']} closed, {counts['open']} open, "
          f"{counts['unused']} unused")
    if details:
        for c in states:
            print(f"channel {c.channel}: {c.state}, {c.bytes} bytes, {c.stores} stores")
    return 0


def _connect(args: argparse.Namespace) -> Tier:
    return Tier.connect(id=args.id, dir=args.dir)


def _store(args: argparse.Namespace) -> int:
    do_store(_connect(args), args.channel, args.file)
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    return do_retrieve(_connect(args), args.channel, args.split, args.print_id, args.sep, args.output_dir,
                       "mpiburst retrieve")


def _status(args: argparse.Namespace) -> int:
    return print_status(_connect(args), args.details)


def _reset(args: argparse.Namespace) -> int:
    tier = _connect(args)
    were = channels.reset(tier, args.channel)
    print(f"run {tier.id}: reset {len(were)} open channel(s)" + (f": {', '.join(map(str, were))}" if were else ""))
    return 0
