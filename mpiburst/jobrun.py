"""Running a job through the tier: stage-in, ``mpiburst run``, stage-out.

:func:`run` is DRMS's ``drms_run`` for the tier: start the run's server (or
join the one already running for this ID, or reload the snapshot a failed run
left), run the job's command with ``MPIBURST_ID`` / ``MPIBURST_CONF`` in its
environment, then decide what happens to the data:

* the command exits 0: :func:`stage_out` every file of the tier per the policy
  (default: SYNC), then stop the server;
* it fails (non-zero, killed, or aborted by SIGTERM / SIGINT, which are
  forwarded to its process group): the *failure rule* — ``retain`` (default:
  save the tier to ``redis_<id>.rdb`` and stop the server, so
  ``mpiburst stage-out --id ID`` or ``mpiburst start --restart --id ID`` or a
  second ``mpiburst run`` with the same ID finishes later), ``sync`` (stage out
  anyway) or ``discard`` (drop the tier's data);
* SIGUSR1 *commits* while the command keeps running: every SYNC and PURGE file
  is synced now (nothing is purged or discarded under a running job). Slurm's
  ``--signal=B:USR1@N`` thus saves a job that is about to hit its time limit.

The exit status is the command's (128 + signal number when a signal killed
it), or the error's exit code when stage-out fails after a successful command.
A server this function started is stopped before it returns, except when its
data could not be saved (a full run directory): then it keeps running with the
data, and the error names the commands that get the data out. One it joined
(started by a prolog or ``mpiburst start``) is left to its starter. A second
``mpiburst run`` of the same run ID and directory while one runs is refused.

:func:`stage_in` and :func:`stage_out` are also the ``mpiburst stage-in`` /
``stage-out`` commands.

With ``$MPIBURST_TIER`` set (a tier URL such as ``mpiburst://NAME``, see
:meth:`mpiburst.tier.Tier.attach`), :func:`run` starts no tier: the command
runs attached to that one, and its data stays there after the command (the
next job reads it; the tier's TTL or ``mpiburst destroy`` ends it), unless a
policy is given: then a successful command's files are staged out per it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import engine_process, flush, iostats, report, residency, server
from .channels import any_data
from .errors import ConfigError, FlushError, MpiburstError, PathError, ServerError
from .nodes import RANKS_PER_NODE
from .paths import resolve
from .policy import INCOMPLETE_SUFFIX, Policy, Rule
from .progress import Meter
from .runconf import RunConf, conf_path, log_name, rdb_name, resolve_id
from .server import StartOptions
from .server.runlock import RunLock
from .store import Store
from .store.cluster_store import FAILOVER_WAIT
from .tier import TIER_ENV, Tier

#: What to do with the tier's data when the command fails.
ON_FAILURE = ("retain", "sync", "discard")
#: Seconds the command gets to exit after a forwarded SIGTERM / SIGINT before SIGKILL.
KILL_AFTER = 10.0

Log = Callable[[str], None]


@dataclass
class Staged:
    """What stage-in or stage-out did to one file: ``action`` (a policy keyword) and a short ``detail``."""

    path: str
    action: str
    detail: str

    def __str__(self) -> str:
        return f"{self.action.lower():8} {self.path}  ({self.detail})"


# ----------------------------------------------------------------------------- stage-in / stage-out

def stage_in(tier: Tier, policy: Policy, paths: Sequence[str] = (), log: Log | None = None) -> list[Staged]:
    """Prestage into the tier the BFS files named by ``paths`` and by the policy's ``IN`` rules.

    Directories are recursive. Every name is checked before anything is
    copied.

    Raises
    ------
    PathError
        If a path or an ``IN`` pattern names no file on the BFS.
    """
    flush.recover(tier.bfs_root)  # a commit killed while publishing is completed before anything is read
    targets = residency.expand(paths, recursive=True, tier=tier, source="bfs") if paths else []
    for rule in policy.inputs():
        found = _bfs_matches(rule, tier.bfs_root)
        if not found:
            raise PathError(f"{rule.source}:{rule.line}: IN {rule.pattern} matches no file on the BFS; "
                            "fix the pattern or create the input, nothing was staged.")
        targets += found
    done = []
    for target in dict.fromkeys(targets):
        staged = residency.prestage(target, tier=tier)
        done.append(_note(Staged(target, "IN", f"{staged} bytes staged"), log))
    return done


def _bfs_matches(rule: Rule, bfs_root: str) -> list[str]:
    """Return the BFS files under ``bfs_root``'s tree that ``rule`` covers, sorted."""
    pattern = rule.absolute(bfs_root)
    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    base = "/".join(parts[:fixed]) or "/"
    if os.path.isfile(base):
        return [os.path.realpath(base)] if rule.matches(os.path.realpath(base), bfs_root) else []
    found = []
    for directory, _, names in os.walk(base):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and rule.matches(path, bfs_root):
                found.append(os.path.realpath(path))
    return sorted(found)


def stage_out(tier: Tier, policy: Policy, paths: Sequence[str] = (), commit: bool = False,
              log: Log | None = None, progress: bool = False, closed_only: bool = False) -> list[Staged]:
    """Apply the policy's stage-out action to the tier's files (all, or those at or under ``paths``).

    The SYNC and PURGE files are flushed together as one consistent cut
    (:func:`mpiburst.flush.commit`): if the application wrote file B after
    it had closed file A, B on the BFS implies A on the BFS.

    Parameters
    ----------
    commit
        Only sync (SYNC and PURGE files): nothing is purged or discarded.
        This is what SIGUSR1 does to a running job; it publishes what
        ``closed_only`` does.
    closed_only
        After a failed job (or while it runs): publish only states the
        application made consistent. A file a handle still has open for
        writing is *incomplete*: published up to its last close or ``Sync``
        only, the rest kept in the tier (so in the run's snapshot) and
        listed as ``incomplete``, unless the policy's ``PARTIAL`` (publish it
        as it stands) or ``BESIDE`` (publish it as ``NAME.incomplete``) rule
        covers it.
    progress
        Show the flush's bytes, rate and time left on stderr (a bar on a
        terminal, a line every few seconds elsewhere; :mod:`mpiburst.progress`).

    Returns
    -------
    list of Staged
        One entry per file, in path order.

    Raises
    ------
    FlushError
        If the flush failed (the SYNC and PURGE files stay dirty; RETAIN and
        DISCARD files were still handled).
    PathError
        If a path is outside the root or names nothing in the tier.
    """
    store = tier.store
    named = residency.expand(paths, recursive=True, tier=tier) if paths else None
    roots = [resolve(p, tier.bfs_root) for p in paths]

    def chosen(path: str) -> bool:
        """A SYNC or PURGE file at or under a named path (the cut decides which files exist)."""
        inside = not roots or any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)
        return inside and policy.action(path, tier.bfs_root) in ("SYNC", "PURGE")

    def published(path: str) -> bool:
        """A chosen file, unless a truncation took its last consistent state (it is listed incomplete):
        after a failure no later state will come, so the others are published without waiting for it."""
        meta = store.meta(path)
        return chosen(path) and (meta is None or meta.settled_state() is not None)

    failure: MpiburstError | None = None
    reports: dict[str, flush.FlushReport] = {}
    meter = _meter(tier, "commit" if commit else "stage-out", chosen) if progress else None
    try:
        reports = {r.path: r for r in flush.commit(tier=tier, select=chosen if not closed_only else published,
                                                   settled=closed_only or commit,
                                                   progress=meter.update if meter else None)}
    except MpiburstError as exc:
        failure = exc
    if meter is not None:
        meter.finish()
    targets = sorted(set(named if named is not None else store.files()) | set(reports))
    done: list[Staged] = []
    for target in targets:
        action = policy.action(target, tier.bfs_root)
        try:
            if closed_only and not commit and failure is None and chosen(target):
                entry = _incomplete(tier, policy, target, reports.get(target))
                if entry is not None:
                    done.append(_note(entry, log))
                    continue
            entry = _stage_out_one(tier, store, target, action, commit, reports.get(target), failure)
        except MpiburstError as exc:
            failure = failure or exc
            entry = Staged(target, action, f"FAILED: {exc}")
        if entry is not None:
            done.append(_note(entry, log))
    if failure is not None:
        raise FlushError(f"stage-out failed (the data stays in the tier; run stage-out again): {failure}")
    return done


def _meter(tier: Tier, label: str, chosen: Callable[[str], bool]) -> Meter:
    """Return a progress meter for flushing the tier's dirty files that ``chosen`` picks (total: their batches)."""
    dirty = [m for m in residency.dirty_files(tier, include_pinned=True) if chosen(m.path)]
    return Meter(f"mpiburst {label}", total=iostats.dirty_bytes(tier.store, dirty))


def _stage_out_one(tier: Tier, store: Store, target: str, action: str, commit: bool,
                   report: flush.FlushReport | None, failure: MpiburstError | None) -> Staged | None:
    """Report one file of the stage-out and do the rest of ``action`` to it (None: nothing to say)."""
    meta = store.meta(target)
    if meta is None:  # removed meanwhile
        return None
    if action in ("RETAIN", "DISCARD") and commit:
        return None
    if action == "DISCARD":
        residency.rm(target, tier=tier)
        return Staged(target, action, "removed from the tier and the BFS")
    if action == "RETAIN":
        dirty = residency.frag_stat(target, tier=tier).dirty
        return Staged(target, action, f"left in the tier, {dirty} bytes dirty")
    if failure is not None:
        return Staged(target, action, f"FAILED: {failure}")
    detail = "already clean" if report is None else f"{report.bytes} bytes in {report.writes} writes"
    if action == "PURGE" and not commit:
        freed = residency.purge(target, tier=tier)
        detail += f", {freed} bytes freed"
    return Staged(target, action, detail)


def _incomplete(tier: Tier, policy: Policy, target: str, report: flush.FlushReport | None) -> Staged | None:
    """Handle ``target`` if a handle still has it open for writing (None: it is not incomplete).

    Its last consistent state is on the BFS (the commit put it there, or it
    was already); what was written since stays in the tier unless the
    policy's ``PARTIAL`` or ``BESIDE`` rule publishes it.
    """
    meta = tier.store.meta(target)
    if meta is None or meta.writers <= 0 or not meta.dirty:
        return None
    if report is not None:
        published = f"its last closed or synced state was published ({report.bytes} bytes)"
    elif os.path.exists(target):
        published = "the BFS keeps its earlier version"
    else:
        published = "nothing of it is on the BFS"
    choice = policy.incomplete(target, tier.bfs_root)
    if choice == "PARTIAL":
        partial = flush.sync(target, tier=tier)
        return Staged(target, "PARTIAL", f"still open for writing: published as it stands, as the policy asks "
                                         f"({partial.bytes} bytes in {partial.writes} writes)")
    if choice == "BESIDE":
        beside = target + INCOMPLETE_SUFFIX
        size = residency.copy_out(target, beside, tier=tier)
        return Staged(target, "BESIDE", f"still open for writing: {published}; its {size} bytes as they stand "
                                        f"were written to {beside}, and stay in the tier")
    return Staged(target, "INCOMPLETE", f"still open for writing: {published}; its later writes stay in the "
                                        f"tier, not under its final name ('mpiburst stage-out --incomplete' "
                                        f"writes them as {os.path.basename(target)}{INCOMPLETE_SUFFIX})")


def _note(entry: Staged, log: Log | None) -> Staged:
    if log is not None:
        log(str(entry))
    return entry


# ----------------------------------------------------------------------------- open a run

def open_run(options: StartOptions, log: Log | None = None, nodes: int = 1) -> tuple[Tier, bool]:
    """Return ``(tier, started)`` for a run: join a live one, reload a saved one, or start a new one.

    With ``nodes`` > 1 a new run gets one server per node, started by a
    background server job (:mod:`mpiburst.nodeserve`, see :func:`node_launcher`).

    ``started`` is True when this process started (or restarted) the server
    and so must stop it. The server is not tied to this process: if the job
    wrapper dies, a server holding data the BFS lacks stays up for
    ``mpiburst stage-out`` (or a Slurm epilog) instead of taking the data with it.
    """
    run_id = resolve_id(options.id, warn=True)
    directory = server.run_directory(options.dir)
    path = conf_path(directory, run_id)
    if os.path.lexists(path):
        conf = RunConf.load(path)
        if server.pid_alive(conf.pid, conf.server):
            if log:
                log(f"joined the running tier of run {run_id} (PID {conf.pid})")
            return Tier.connect(conf=conf), False
    saved = server.saved_nodes(directory, run_id)
    restart = saved > 0 or os.path.exists(os.path.join(directory, rdb_name(run_id)))
    if nodes > 1 and (not restart or saved == nodes):  # a saved run of as many nodes comes back on the job's nodes
        if restart and log:
            log(f"reloading the data run {run_id} saved in {saved} node snapshots in {directory}")
        conf = _start_nodes(options.replace(id=run_id, dir=directory, restart=restart), nodes)
        tier = Tier.connect(conf=conf)
        if log:
            log(f"started the tier of run {run_id} on {nodes} nodes (PIDs "
                f"{', '.join(str(n['pid']) for n in conf.nodes)}, {tier.channels} channels, BFS root {tier.bfs_root}, "
                f"{'mutual TLS' if conf.tls else 'plaintext TCP: the network was declared private (--trust-network)'})")
        return tier, True
    if restart and log:
        log(f"reloading the data run {run_id} saved in {_snapshot_name(directory, run_id)}")
    conf = engine_process.attach(server.start_run(options.replace(id=run_id, dir=directory, restart=restart)))
    tier = Tier.connect(conf=conf)
    if log:
        log(f"started the tier of run {run_id} (PID {tier.conf.pid}, {tier.channels} channels, "
            f"BFS root {tier.bfs_root})")
    return tier, True


#: Seconds a multi-node run's server job may take to start every node's server and form the cluster.
NODES_START_TIMEOUT = 120.0
#: The server jobs of multi-node runs this process launched, by run conf path.
_node_jobs: dict[str, subprocess.Popen] = {}


def node_launcher(nodes: int) -> list[str]:
    """Return the command that starts one process on each of ``nodes`` nodes.

    ``$MPIBURST_NODE_LAUNCH`` (split like a shell line) if set; under Slurm
    ``srun --nodes=N --ntasks=N --ntasks-per-node=1``; else ``mpiexec -n N -ppn 1``.
    """
    given = os.environ.get("MPIBURST_NODE_LAUNCH")
    if given:
        return shlex.split(given)
    if os.environ.get("SLURM_JOB_ID"):
        return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--overlap"]
    return ["mpiexec", "-n", str(nodes), "-ppn", "1"]


def _start_nodes(opts: StartOptions, nodes: int) -> RunConf:
    """Start a multi-node run's server job (:mod:`mpiburst.nodeserve`) in the background; return the run's conf.

    Raises
    ------
    ServerError
        If the job exits before the conf is written, or does not write it within :data:`NODES_START_TIMEOUT`.
    """
    options = {k: v for k, v in dataclasses.asdict(opts).items() if v not in (None, False)}
    per = os.environ.get(RANKS_PER_NODE)
    command = [*node_launcher(nodes), sys.executable, "-m", "mpiburst.nodeserve", "--options", json.dumps(options),
               "--lock-held"]  # run() holds the run's start lock for the whole job
    if per:
        command += ["--ranks-per-node", per]
    path = conf_path(opts.dir or os.getcwd(), opts.id or "")
    log = os.path.join(opts.dir or os.getcwd(), f"mpiburst_{opts.id}.nodes.log")
    fd = engine_process.open_log(log)
    env = dict(os.environ, **{RANKS_PER_NODE: "1"})  # the server job runs one rank per node
    try:
        job = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                               start_new_session=True)
    except OSError as exc:
        raise ServerError(f"cannot launch the tier's server job {command[0]!r} ({exc.strerror}); set "
                          f"MPIBURST_NODE_LAUNCH to a command that starts one process per node.") from None
    finally:
        os.close(fd)
    deadline = time.monotonic() + NODES_START_TIMEOUT
    while True:
        if os.path.exists(path):
            conf = RunConf.load(path)
            if conf.nodes and conf.pid is not None and conf.engine_pid is not None:  # not a saved run's old conf
                _node_jobs[conf.path] = job
                return conf
        if job.poll() is not None or time.monotonic() > deadline:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
            raise ServerError(f"the tier's server job on {nodes} nodes did not start the run "
                              f"({'it exited with status ' + str(job.returncode) if job.returncode is not None else 'timed out'}); "
                              f"its log {log} ends: {server.log_tail(log)}")
        time.sleep(0.1)


def _end_node_job(conf: RunConf) -> None:
    """Wait (bounded) for a stopped multi-node run's server job to end; kill it if it does not."""
    job = _node_jobs.pop(conf.path, None)
    if job is None:
        return
    try:
        job.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    if job.returncode == 0:  # a failed job's log stays for the user to read
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(conf.dir, f"mpiburst_{conf.id}.nodes.log"))


def _snapshot_name(directory: str, run_id: str) -> str:
    """Return how to name a run's snapshot in messages: its file, or its nodes' files."""
    saved = server.saved_nodes(directory, run_id)
    if saved:
        return f"{saved} node snapshots {os.path.join(directory, rdb_name(run_id + '@0'))} etc."
    return os.path.join(directory, rdb_name(run_id))


def finish_saved(id: str | None = None, dir: str | None = None, log: Log | None = None) -> tuple[Tier, bool]:
    """Return a tier for stage-out: the live run, or the saved one reloaded (``started`` True).

    The snapshots of a multi-node run are reloaded on this host, one server per saved node.
    """
    run_id = resolve_id(id)
    directory = os.path.abspath(dir or os.getcwd())
    path = conf_path(directory, run_id)
    if os.path.lexists(path):
        conf = RunConf.load(path)
        if server.pid_alive(conf.pid, conf.server):
            return Tier.connect(conf=conf), False
    if not os.path.exists(os.path.join(directory, rdb_name(run_id))) and not server.saved_nodes(directory, run_id):
        raise ConfigError(f"run {run_id} is neither running nor saved in {directory}; check --id and --dir.")
    if log:
        log(f"reloading the data run {run_id} saved in {_snapshot_name(directory, run_id)}")
    conf = engine_process.attach(server.start_run(StartOptions(id=run_id, dir=directory, restart=True)))
    return Tier.connect(conf=conf), True


def close_run(tier: Tier, keep: bool, log: Log | None = None) -> bool:
    """Stop a server this process started: saved to ``redis_<id>.rdb`` when ``keep`` and it holds data.

    A multi-node run is saved node by node (``redis_<id>@<k>.rdb``, each node's own data).
    Returns whether a snapshot was saved (nothing is saved of an empty tier).
    """
    keep = keep and not tier.store.empty()
    tier.disconnect()
    # discard also removes a snapshot this run was reloaded from: its data is now on the BFS
    server.stop_run(tier.conf, save=keep, discard=not keep)
    _end_node_job(tier.conf)
    if log:
        saved = f"; its data is saved in {_snapshot_name(tier.conf.dir, tier.id)}" if keep else ""
        log(f"stopped the tier of run {tier.id}{saved}")
    return keep


def holds_unsaved(tier: Tier) -> bool:
    """Return True if the tier holds data the BFS does not: dirty files, or channel data."""
    return bool(residency.dirty_files(tier, include_pinned=True)) or any_data(tier)


# ----------------------------------------------------------------------------- mpiburst run

class _Signals:
    """SIGUSR1 / SIGTERM / SIGINT / SIGHUP handling while the command runs."""

    FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.commit = False
        self.aborted: int | None = None
        self.abort_time = 0.0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, *self.FORWARDED):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            self.commit = True
            return
        if self.aborted is None:
            self.aborted, self.abort_time = signum, time.monotonic()
        self.forward(signum)

    def forward(self, signum: int) -> None:
        """Send ``signum`` to the command's process group."""
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signum)


def run(command: Sequence[str], options: StartOptions | None = None, *, policy: Policy | None = None,
        on_failure: str = "retain", log: Log | None = None, nodes: int | None = None, **changes: Any) -> int:
    """Run ``command`` with a tier around it (see the module docstring); return its exit status.

    Parameters
    ----------
    command
        The program and its arguments (typically ``mpiexec`` / ``srun`` ...).
    options, **changes
        The tier's start options (:class:`mpiburst.server.StartOptions`, or
        their names as keywords); ``restart`` is decided here (a saved run is reloaded).
    policy
        The stage-out policy (default: SYNC every file).
    on_failure
        ``retain``, ``sync`` or ``discard``: what happens to the data when
        the command fails or is aborted.
    log
        Called with one line per step (start, staged files, stop).
    nodes
        Servers to start, one per node (default ``$MPIBURST_NODES``, else the
        job's node count). A multi-node run is retained as one snapshot per
        node; the next ``run`` with the same ID reloads it on as many nodes
        (or on this host, on another node count).

    Raises
    ------
    ConfigError
        On a bad option (before anything is started), or when another
        ``mpiburst run`` (or start) of the same run ID and directory is under way.
    ServerError
        If the tier cannot be started, its snapshot cannot be saved (the
        server then keeps running with the data), or it died.
    """
    opts = StartOptions.of(options, **changes)
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"--on-failure {on_failure!r} is not one of {', '.join(ON_FAILURE)}.")
    if not command:
        raise ConfigError("no command to run; give it after '--', e.g. mpiburst run -- mpiexec -n 4 ./app.")
    if os.environ.get(TIER_ENV):
        _refuse_start_options(os.environ[TIER_ENV], opts, on_failure, nodes)
        return _run_attached(command, os.environ[TIER_ENV], policy, log or (lambda line: None), log is not None)
    run_id = resolve_id(opts.id, warn=True)
    directory = server.run_directory(opts.dir)
    # One job wrapper per run: a second one (another step of the same job) is refused, never merged.
    with RunLock(directory, run_id, "mpiburst run"):
        return _run_locked(command, opts.replace(id=run_id, dir=directory), policy or Policy(), on_failure,
                           log or (lambda line: None), progress=log is not None, nodes=nodes or run_nodes())


def _refuse_start_options(url: str, opts: StartOptions, on_failure: str, nodes: int | None) -> None:
    """Refuse the options that start a tier when ``run`` attaches to the one ``url`` names (they would do nothing).

    Raises
    ------
    ConfigError
        Naming the options given.
    """
    given = [name for name in StartOptions.names() if getattr(opts, name) != getattr(StartOptions(), name)]
    given += (["nodes"] if nodes is not None else []) + (["on_failure"] if on_failure != "retain" else [])
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"MPIBURST_TIER={url} makes 'mpiburst run' attach to that tier and start none, so {flags} "
                          f"would do nothing; drop {'it' if len(given) == 1 else 'them'}, or unset MPIBURST_TIER to "
                          f"start a tier for the job.")


def _run_attached(command: Sequence[str], url: str, policy: Policy | None, say: Log, progress: bool) -> int:
    """:func:`run` on the tier ``url`` names (``$MPIBURST_TIER``): no tier is started or stopped here."""
    tier = Tier.attach(url)
    kept = "its data stays there" if policy is None else "a successful command's files are staged out per the policy"
    say(f"attached to the tier {url} ({tier.channels} channels, BFS root {tier.bfs_root}); {kept}")
    signals = _Signals()
    signals.install()
    try:
        status = _supervise(command, tier, policy or Policy(), signals, say, progress)
        if policy is not None and status == 0 and signals.aborted is None:
            stage_out(tier, policy, log=say, progress=progress)
        return status
    finally:
        signals.restore()
        tier.disconnect()


def run_nodes() -> int:
    """Return how many servers ``mpiburst run`` starts: ``$MPIBURST_NODES``, else the job's node count."""
    text = os.environ.get("MPIBURST_NODES", "").strip()
    if not text:
        return server.job_nodes()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"MPIBURST_NODES={text!r} is not a whole number of at least 1; set the number of nodes "
                          f"to start a server on, or unset it.")
    return int(text)


def _run_locked(command: Sequence[str], opts: StartOptions, policy: Policy, on_failure: str, say: Log,
                progress: bool = False, nodes: int = 1) -> int:
    """:func:`run` once the run's lock is held (``progress``: show the stage-out's and commits' progress)."""
    signals = _Signals()
    signals.install()   # before the server starts: a SIGUSR1 / SIGTERM meanwhile is kept, never fatal to us
    try:
        tier, started = open_run(opts, log=say, nodes=nodes)
    except BaseException:
        signals.restore()
        raise
    closing = False
    watch = _Watch()
    try:
        if flush.recover(tier.bfs_root):
            say("completed the publication of a commit that was killed while renaming its files")
        status = _supervise(command, tier, policy, signals, say, progress, watch)
        failed = status != 0 or signals.aborted is not None
        if failed:
            say(f"the command failed (exit status {status}); applying --on-failure {on_failure}")
        died = _server_died(tier, started, watch)
        if died is not None:
            raise died
        keep = False
        if not failed or on_failure == "sync":
            try:
                stage_out(tier, policy, log=say, progress=progress, closed_only=failed)
            except MpiburstError as exc:
                say(f"stage-out failed: {exc}")
                keep = True
                if not failed:
                    status = exc.exit_code
            keep = keep or (failed and holds_unsaved(tier))   # an incomplete file stays in the snapshot
        elif on_failure == "retain":
            keep = True
            _say_incomplete(tier, say)
        if not started:
            _write_reports(tier, live=True, say=say)
        if started:
            closing = True
            saved = close_run(tier, keep=keep, log=say)
            _write_reports(tier, live=False, say=say)
            if saved:   # advice only where there is something to finish
                say(f"finish it later with 'mpiburst stage-out --id {tier.id} --dir {shlex.quote(tier.conf.dir)}', "
                    f"or run the job again with the same --id")
        elif on_failure == "discard" and failed:
            say(f"the tier of run {tier.id} was joined, not started here: its data is left to its owner")
        return status
    except BaseException:
        died = _server_died(tier, started, watch)
        if died is not None:
            raise died from None
        if started and not closing:  # close_run stops the server only once its data is saved
            close_run(tier, keep=True, log=say)
            _write_reports(tier, live=False, say=say)
        raise
    finally:
        signals.restore()


def _write_reports(tier: Tier, live: bool, say: Log) -> None:
    """Write the job's I/O report (``mpiburst_<id>.report.json`` / ``.html``) beside the run's files.

    ``live``: from the running server; else from the statistics its stop saved.
    A report that cannot be written is said, never an error of the job.
    """
    saved = iostats.stats_path(tier.conf.dir, tier.id)
    try:
        # not live and nothing saved: the run recorded no I/O
        stats = tier.store.stats() if live else iostats.load_stats(saved) if os.path.exists(saved) else ({}, [])
        paths = report.write_beside(report.from_stats(stats, tier.id), tier.conf.dir, tier.id)
        say(f"I/O report: {paths[0]} and {paths[1]}")
    except (MpiburstError, OSError, ValueError) as exc:
        say(f"no I/O report was written: {exc}")


class _Watch:
    """What ``mpiburst run`` last saw of the tier's files, to say after a server death what the BFS lacks.

    Every :data:`LOOK_EVERY` seconds while the command runs, one atomic read
    of every file's record (:meth:`Store.cut`) gives the files whose last
    closed or synced state the BFS does not hold yet (*behind*), and those
    a handle had open for writing (*open*).
    """

    def __init__(self) -> None:
        self.when: float | None = None
        self.behind: list[str] = []
        self.open: list[str] = []
        self._next = 0.0

    def look(self, store: Store) -> None:
        """Take a look if one is due; a failing look (a dying server) keeps the last one."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + LOOK_EVERY
        try:
            cut = store.cut()
        except MpiburstError:
            return
        behind = []
        for path, meta in cut.items():
            state = meta.settled_state()
            if state is not None and state.dirty:
                behind.append(path)
        self.behind = sorted(behind)
        self.open = sorted(p for p, m in cut.items() if m.writers > 0)
        self.when = now

    def says(self) -> str:
        """Return what the last look found, as a clause of the dead-server message."""
        if self.when is None:
            return "mpiburst run had not looked at the tier's files yet"
        ago = f"as of the last look at the tier, {time.monotonic() - self.when:.1f} s before the death was found"
        if self.behind:
            said = f"{ago}, the BFS lacked the last closed or synced state of {_names(self.behind)}"
        else:
            said = f"{ago}, every file the application had closed or synced was on the BFS"
        if self.open:
            said += f"; being written then (never published half-written): {_names(self.open)}"
        return said + "; a file closed after that look may be missing too"


#: Seconds between two looks of ``mpiburst run`` at the tier's files (:class:`_Watch`).
LOOK_EVERY = 0.5


def _names(paths: list[str], most: int = 20) -> str:
    """Return up to ``most`` paths joined for a message, and how many more."""
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _say_incomplete(tier: Tier, say: Log) -> None:
    """Name the files a handle still had open for writing when the command failed (they are incomplete)."""
    try:
        open_now = sorted(p for p, m in tier.store.cut().items() if m.writers > 0 and m.dirty)
    except MpiburstError:
        return
    if open_now:
        say(f"still open for writing when the command failed, so incomplete: {_names(open_now)}; a stage-out "
            f"publishes only their last closed or synced state and keeps the rest in the tier")


def _server_died(tier: Tier, started: bool, watch: _Watch | None = None) -> ServerError | None:
    """Return the error to report if the run's server is gone (cleaning its files if this process started it).

    With replicas, node 0's server (the records) gone but its replica
    promoted is no death: the run goes on from the replica, so its
    stage-out commits, or its stop saves, what the nodes hold.
    """
    conf = tier.conf
    if server.pid_alive(conf.pid, conf.server):
        return None
    if conf.nodes and conf.replicas and server.serving(conf, 0, wait=FAILOVER_WAIT) is not None:
        return None
    tail = server.log_tail(os.path.join(conf.dir, log_name(conf.id)))
    tier.disconnect()
    if started:
        server.stop_run(conf, discard=True)  # only removes the dead server's files
    seen = watch.says() if watch is not None else "which files the BFS lacks is not known"
    return ServerError(
        f"the server of run {conf.id} (PID {conf.pid}) died while the command ran; what it held that was "
        f"not yet on the BFS is lost: {seen}; its log ended: {tail}"
    )


def _supervise(command: Sequence[str], tier: Tier, policy: Policy, signals: _Signals, say: Log,
               progress: bool = False, watch: _Watch | None = None) -> int:
    """Run the command in its own process group; commit on SIGUSR1; look at the files; return its exit status."""
    env = dict(os.environ, MPIBURST_ID=tier.id, MPIBURST_CONF=tier.conf.path)
    try:
        signals.child = subprocess.Popen(list(command), env=env, process_group=0)
    except OSError as exc:
        say(f"cannot run {command[0]!r}: {exc.strerror}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    child = signals.child
    if signals.aborted is not None:  # a signal arrived while starting it
        signals.forward(signals.aborted)
    killed = False
    while True:
        try:
            code = child.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        if watch is not None:
            watch.look(tier.store)
        if signals.commit:
            signals.commit = False
            say("SIGUSR1: committing (syncing the tier's SYNC and PURGE files) while the command runs")
            try:
                stage_out(tier, policy, commit=True, log=say, progress=progress)
            except MpiburstError as exc:
                say(f"commit failed: {exc}")
        if signals.aborted is not None and not killed and time.monotonic() - signals.abort_time > KILL_AFTER:
            say(f"the command did not exit {KILL_AFTER:.0f} s after the signal; killing it")
            signals.forward(signal.SIGKILL)
            killed = True
    return 128 - code if code < 0 else code
