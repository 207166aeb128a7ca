"""mem_io's commands, unchanged for existing job scripts: ``mem_io_start`` ... ``mem_io_stop``.

Each console script takes mem_io's single-dash options and exits with its
codes (21 invalid channel, 22 invalid channel count, 24 channel open, 51
authentication, 13 server); the work is done by :mod:`mpiburst.channels` and
the ordinary run lifecycle. Differences from mem_io, all for safety: the
client conf is ``mpiburst_<ID>.conf`` (not ``mem_io_<ID>.conf``), the server
gets a free port and a unix socket instead of 6379, and the password is never
accepted on a command line. The ID is ``-mem_io_id``, else ``$MPIBURST_ID``,
``$SLURM_JOB_ID``, ``$PBS_JOBID``, else ``default``, as for every mpiburst
command; files live in the current directory, as with mem_io.

Also runnable as ``python -m mpiburst.memio start|store|retrieve|status|reset|stop [options]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import channels, engine_process, server
from .errors import MpiburstError
from .runconf import RunConf, find_conf_path

#: mem_io's exit code for a channel count below 1.
EXIT_CHANNEL_COUNT = 22


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=name, description=description, allow_abbrev=False)
    p.add_argument("-mem_io_id", dest="id", metavar="ID", help="run ID (default: $PBS_JOBID etc., else 'default')")
    return p


def _tier(args: argparse.Namespace):
    from .tier import Tier

    return Tier.connect(id=args.id, dir=os.getcwd())


def start(argv: Sequence[str] | None = None) -> int:
    """``mem_io_start -nr_channels N [-mem_io_id ID] [-port P] [-restart]``."""
    p = _parser("mem_io_start", "Start the run's server with N channels (once per job, never in worker tasks).")
    p.add_argument("-nr_channels", dest="channels", type=int, metavar="N", help="number of channels (>= 1)")
    p.add_argument("-port", type=int, help="TCP port (default: a free one)")
    p.add_argument("-restart", action="store_true", help="reload redis_<ID>.rdb saved by mem_io_stop")
    args = p.parse_args(argv)
    if args.channels is None and not args.restart or args.channels is not None and args.channels < 1:
        print(f"mem_io_start: the number of channels must be at least 1 (got {args.channels}); "
              "give -nr_channels N.", file=sys.stderr)
        return EXIT_CHANNEL_COUNT
    return _guard("mem_io_start", lambda: engine_process.attach(server.start_run(server.StartOptions(
        id=args.id, dir=os.getcwd(), channels=args.channels, port=args.port, restart=args.restart))))


def store(argv: Sequence[str] | None = None) -> int:
    """``producer | mem_io_store -channel_id C [-mem_io_id ID]``."""
    from .cli.channels import do_store

    p = _parser("mem_io_store", "Append stdin to channel C.")
    p.add_argument("-channel_id", dest="channel", type=int, required=True, metavar="C")
    args = p.parse_args(argv)
    return _guard("mem_io_store", lambda: do_store(_tier(args), args.channel, "-"))


def retrieve(argv: Sequence[str] | None = None) -> int:
    """``mem_io_retrieve [-channel_id C] [-split] [-print_id [-sep S]] [-mem_io_id ID]``."""
    from .cli.channels import do_retrieve

    p = _parser("mem_io_retrieve", "Write the channels to stdout in order, or one file each with -split.")
    p.add_argument("-channel_id", dest="channel", type=int, metavar="C")
    p.add_argument("-split", action="store_true")
    p.add_argument("-print_id", action="store_true")
    p.add_argument("-sep", default=" ")
    args = p.parse_args(argv)
    return _guard("mem_io_retrieve", lambda: do_retrieve(_tier(args), args.channel, args.split, args.print_id,
                                                         args.sep, os.getcwd(), "mem_io_retrieve"))


def status(argv: Sequence[str] | None = None) -> int:
    """``mem_io_status [-details] [-mem_io_id ID]``."""
    from .cli.channels import print_status

    p = _parser("mem_io_status", "Count closed, open and unused channels.")
    p.add_argument("-details", action="store_true")
    args = p.parse_args(argv)
    return _guard("mem_io_status", lambda: print_status(_tier(args), args.details))


def reset(argv: Sequence[str] | None = None) -> int:
    """``mem_io_reset [-channel_id C] [-mem_io_id ID]``: close channels a crashed writer left open."""
    p = _parser("mem_io_reset", "Close channels left open by crashed writers.")
    p.add_argument("-channel_id", dest="channel", type=int, metavar="C")
    args = p.parse_args(argv)
    return _guard("mem_io_reset", lambda: channels.reset(_tier(args), args.channel))


def stop(argv: Sequence[str] | None = None) -> int:
    """``mem_io_stop [-mem_io_id ID]``: stop the server; its data stays in redis_<ID>.rdb for -restart."""
    p = _parser("mem_io_stop", "Stop the run's server, saving its data for mem_io_start -restart.")
    args = p.parse_args(argv)
    return _guard("mem_io_stop", lambda: server.stop_run(RunConf.load(find_conf_path(args.id, os.getcwd())),
                                                         save=True))


def _guard(name: str, action: Callable[[], object]) -> int:
    """Run ``action``; return 0, or print an expected error as one line and return its exit code."""
    try:
        action()
        return 0
    except MpiburstError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.exit_code


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "start": start, "store": store, "retrieve": retrieve, "status": status, "reset": reset, "stop": stop,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpiburst.memio COMMAND [mem_io options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m mpiburst.memio {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


def _script(command: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    return lambda: sys.exit(command(None))


# Console-script entry points (setup.py: mem_io_start=mpiburst.memio:start_main, ...).
start_main, store_main, retrieve_main, status_main, reset_main, stop_main = (
    _script(c) for c in (start, store, retrieve, status, reset, stop))

if __name__ == "__main__":
    sys.exit(main())
