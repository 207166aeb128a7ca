"""The ``mpiburst`` command: one sub-command per operation, grouped by area.

Each area module (``lifecycle``, ``residency``, ``jobs``, ``channels``,
``bench``) adds its sub-commands with ``register(subparsers)``. Expected
errors (:class:`mpiburst.errors.MpiburstError`) are printed as one line and
turned into the error's exit code; only real bugs show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import MpiburstError

AREAS = ("lifecycle", "named", "residency", "jobs", "channels", "bench", "report", "checkpoint")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``mpiburst`` command with every area's sub-commands."""
    parser = argparse.ArgumentParser(
        prog="mpiburst",
        description="A per-job burst buffer for MPI jobs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for area in AREAS:
        try:
            module = importlib.import_module(f"{__name__}.{area}")
        except ModuleNotFoundError as exc:  # an area not built yet in this checkout
            if exc.name != f"{__name__}.{area}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mpiburst`` command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except MpiburstError as exc:
        print(f"mpiburst {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mpiburst {args.command}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
