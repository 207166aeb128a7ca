"""``mpiburst run`` / ``stage-in`` / ``stage-out``: jobs and their data from the shell.

``run`` wraps a job's command with a tier (:func:`mpiburst.jobrun.run`); its
messages go to stderr so the command's stdout stays the job's. ``stage-in``
and ``stage-out`` apply a policy file (:mod:`mpiburst.policy`) and print one
line per file; ``stage-out`` reloads a run saved by a failed ``run`` and stops
it again when done.
"""

from __future__ import annotations

import argparse
import sys

from .. import jobrun as jobs
from .. import policy as policies
from .lifecycle import add_locator, add_start_options, start_options


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run``, ``stage-in`` and ``stage-out`` sub-commands."""
    p = sub.add_parser(
        "run", help="run a command with a tier around it, then stage its data out",
        description="Start the tier (or join the live one for this ID, or reload a failed run's saved data), "
                    "run COMMAND with MPIBURST_ID and MPIBURST_CONF set, then stage out per the policy and stop "
                    "the tier. On failure the --on-failure rule applies. SIGUSR1 syncs now and continues; "
                    "SIGTERM/SIGINT are forwarded to COMMAND. Exits with COMMAND's status.")
    add_start_options(p, restart=False)
    p.add_argument("--policy", "-f", metavar="FILE", help="stage-out policy file (default: SYNC every file)")
    p.add_argument("--on-failure", choices=jobs.ON_FAILURE, default="retain",
                   help="when COMMAND fails: retain (save the tier for a later stage-out; default), "
                        "sync (stage out anyway) or discard (drop the tier's data)")
    p.add_argument("--nodes", type=int, default=None, metavar="N",
                   help="start one server per node on N nodes, joined into one cluster (default: $MPIBURST_NODES, "
                        "else the job's node count); launched with $MPIBURST_NODE_LAUNCH, else srun or mpiexec")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    # dest is not "command": that name holds the sub-command ("run"), which prefixes the run's own errors
    p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the job's command")
    p.set_defaults(func=_run)

    p = sub.add_parser("stage-in", help="prestage input files into the tier (blocking)",
                       description="Copy BFS files into the tier before a job: the PATHs (directories "
                                   "recursively) and the IN rules of the policy file.")
    add_locator(p)
    p.add_argument("-f", "--policy", metavar="POLICY", help="policy file whose IN rules name the inputs")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the run and a summary")
    p.add_argument("paths", nargs="*", metavar="PATH", help="BFS files or directories (or burst:// URLs)")
    p.set_defaults(func=_stage_in)

    p = sub.add_parser("stage-out", help="sync / purge / retain / discard the tier's files per a policy (blocking)",
                       description="Apply the policy to the tier's files (all, or those under the PATHs): SYNC "
                                   "(default) copies to the BFS, PURGE copies then frees the tier, RETAIN leaves "
                                   "them, DISCARD removes them from the tier and the BFS. A run saved by a failed "
                                   "'mpiburst run' is reloaded, staged out, and stopped again.")
    add_locator(p)
    p.add_argument("-f", "--policy", metavar="POLICY", help="policy file")
    p.add_argument("-s", "--sync", action="append", default=[], metavar="LIST",
                   help="comma-separated patterns to SYNC (win over the policy file; repeatable)")
    p.add_argument("-p", "--purge", action="append", default=[], metavar="LIST", help="patterns to PURGE")
    p.add_argument("-d", "--discard", action="append", default=[], metavar="LIST", help="patterns to DISCARD")
    p.add_argument("--incomplete", action="store_true",
                   help="also write each file still open for writing when the job failed, as it stands, to "
                        "NAME.incomplete beside its final name (never under it; see the policy's PARTIAL)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the run and a summary")
    p.add_argument("paths", nargs="*", metavar="PATH", help="limit to these files or directories")
    p.set_defaults(func=_stage_out)




def _stderr(line: str) -> None:
    print(f"mpiburst run: {line}", file=sys.stderr, flush=True)


def _stdout(line: str) -> None:
    print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    policy = policies.load(args.policy) if args.policy else None   # None: the default (SYNC every file)
    return jobs.run(command, start_options(args), policy=policy, on_failure=args.on_failure,
                    log=None if args.quiet else _stderr, nodes=args.nodes)


def _stage_in(args: argparse.Namespace) -> int:
    from ..tier import Tier

    policy = policies.load(args.policy)
    if not args.paths and not policy.inputs():
        print("mpiburst stage-in: nothing to stage: give PATHs or a policy with IN rules.", file=sys.stderr)
        return 2
    tier = Tier.connect(id=args.id, dir=args.dir)
    try:
        done = jobs.stage_in(tier, policy, args.paths, log=_stdout)
    finally:
        tier.disconnect()
    if args.verbose:
        print(f"stage-in: {len(done)} files staged into run {tier.id}")
    return 0


def _stage_out(args: argparse.Namespace) -> int:
    policy = policies.load(args.policy)
    for keyword, lists in (("SYNC", args.sync), ("PURGE", args.purge), ("DISCARD", args.discard)):
        policy.extend(keyword, lists)
    if args.incomplete:
        policy.extend("BESIDE", ["."])   # every file: the BFS root and below
    tier, started = jobs.finish_saved(id=args.id, dir=args.dir, log=_stdout if args.verbose else None)
    keep = True
    try:   # a file a dead job left open for writing is never published half-written under its name
        done = jobs.stage_out(tier, policy, args.paths, log=_stdout, progress=True, closed_only=True)
        keep = jobs.holds_unsaved(tier)
    finally:
        if started:
            jobs.close_run(tier, keep=keep, log=_stdout if args.verbose else None)
        else:
            tier.disconnect()
    if args.verbose:
        print(f"stage-out: {len(done)} files of run {tier.id}")
    return 0
