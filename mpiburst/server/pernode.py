"""A multi-node run started one node at a time, without MPI: how a site's prolog starts it.

Slurm runs the prolog on every node of a job, each on its own; each runs
``mpiburst start --nodes N --node K`` as the job's user, with the run
directory on a filesystem every node sees at the same path:

* node 0 plans the run (the conf without nodes and the admin file, both
  0600, as :func:`.lifecycle.plan_cluster`), starts its server, waits for
  every other node's entry, forms the cluster and saves the conf with every
  node (then ``mpiburst start`` starts the engine beside it);
* node K > 0 waits for node 0's plan, starts its server with the plan's
  credentials and writes its entry ``mpiburst_<id>@<K>.node`` (0600: its
  address, PID and server binary, and a token tying it to this plan, so a
  stale entry of an earlier attempt of the same job is never taken).

Every node also keeps its own entry file until the run is stopped: the
node's epilog reads its server's PID there, whether or not the cluster was
ever formed. Every wait is bounded (:data:`JOIN_TIMEOUT`, or the caller's);
a node that fails stops the server it started (node 0 also removes the
plan), and the message names what was missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from ..errors import ConfigError, ServerError
from ..nodes import app_ranges, ranks_per_node
from ..runconf import (
    AdminCredentials,
    RunConf,
    conf_path,
    node_entry_path,
    parse_json,
    read_secure,
    resolve_id,
    write_secure,
)
from . import cluster
from .lifecycle import (
    ClusterPlan,
    abandon_cluster,
    choose_maxclients,
    form_planned,
    launch_planned_node,
    plan_cluster,
    run_directory,
)
from .options import StartOptions
from .runlock import RunLock

#: Seconds a node waits for node 0's plan, and node 0 for every other node's entry.
JOIN_TIMEOUT = 60.0


def plan_token(conf: RunConf) -> str:
    """Return a token naming one plan of a run (a digest of its fresh password; the password itself stays secret)."""
    return hashlib.sha256(f"mpiburst-plan:{conf.password}".encode()).hexdigest()[:32]


def start_node(options: StartOptions | None, index: int, count: int,
               timeout: float | None = None) -> tuple[RunConf, int]:
    """Start node ``index`` of a ``count``-node run on this host; return the run's conf and the server's PID.

    Node 0's conf is the formed run's (every node); node ``index`` > 0's is node 0's plan.

    Node 0's caller starts the engine (:func:`mpiburst.engine_process.attach`), as after :func:`start_run`.

    Parameters
    ----------
    options
        The start options; ``dir`` must be the same directory on every node.
        ``channels`` (the application's ranks) are split into blocks of
        ``$MPIBURST_RANKS_PER_NODE``, else evenly, one block per node.
    index, count
        This node's index and the number of nodes.
    timeout
        Seconds to wait for node 0's plan (node ``index`` > 0) or for every
        other node's entry (node 0); default :data:`JOIN_TIMEOUT`.

    Raises
    ------
    ConfigError
        On a bad option or node index, or a live run with the same ID.
    ServerError
        If the server does not come up, the plan or an entry does not come in
        time, or the cluster does not form; the server this call started is
        stopped.
    """
    opts = StartOptions.of(options)
    if count < 2 or not 0 <= index < count:
        raise ConfigError(f"node {index} of {count} is not a node of a multi-node run; give --nodes N (at least 2) "
                          f"and --node K with 0 <= K < N.")
    if opts.restart:
        raise ConfigError("a run started one node at a time cannot be reloaded from a snapshot yet; start it "
                          "without --restart.")
    wait = JOIN_TIMEOUT if timeout is None else timeout
    run_id = resolve_id(opts.id, warn=True)
    directory = run_directory(opts.dir)
    opts = opts.replace(id=run_id, dir=directory)
    if index == 0:
        with RunLock(directory, run_id, "mpiburst start"):
            plan = plan_cluster(opts, nodes_here=False, count=count)
            conf = _lead(plan, count, wait)
            return conf, conf.nodes[0]["pid"]
    plan = _await_plan(opts, index, wait)
    entry = _launch(plan, index, count)
    try:
        _write_entry(plan.conf, index, entry)
    except BaseException:
        cluster.kill_node(plan.conf, entry)
        cluster.clean_node(plan.conf, index, entry["socket"])
        raise
    return plan.conf, entry["pid"]


def _launch(plan: ClusterPlan, index: int, count: int) -> dict[str, Any]:
    """Start this node's server (untied: it outlives the prolog) and return its entry."""
    ranges = app_ranges(plan.conf.channels, count, ranks_per_node())
    return launch_planned_node(plan, index, count, ranges[index], tied=False)


def _write_entry(conf: RunConf, index: int, entry: dict[str, Any]) -> None:
    """Write node ``index``'s entry file (0600 from the first byte)."""
    write_secure(node_entry_path(conf.dir, conf.id, index),
                 json.dumps(dict(entry, server=conf.server, plan=plan_token(conf))) + "\n")


def _lead(plan: ClusterPlan, count: int, wait: float) -> RunConf:
    """Node 0: start its server, wait for the others' entries, form the cluster and save the conf."""
    conf = plan.conf
    entry = _launch(plan, 0, count)
    try:
        _write_entry(conf, 0, entry)
        entries = [entry] + _await_entries(conf, count, wait)
        return form_planned(plan, entries)
    except BaseException:
        cluster.kill_node(conf, entry)
        cluster.clean_node(conf, 0, entry["socket"])
        abandon_cluster(conf)
        raise


def _await_plan(opts: StartOptions, index: int, wait: float) -> ClusterPlan:
    """Node ``index`` > 0: wait for node 0's plan (the conf without nodes, and the admin file) and return it."""
    assert opts.dir is not None and opts.id is not None
    path = conf_path(opts.dir, opts.id)
    deadline = time.monotonic() + wait
    while True:
        if os.path.lexists(path):
            try:
                conf = RunConf.load(path)
                admin = AdminCredentials.load(conf)
            except ConfigError:
                conf = None   # being written or replaced: look again
            if conf is not None:
                if conf.nodes or conf.pid is not None:
                    raise ConfigError(f"run {opts.id} in {opts.dir} is already running without node {index}; stop it "
                                      f"with 'mpiburst stop --id {opts.id} --dir {opts.dir}' first.")
                bind = opts.bind
                return ClusterPlan(conf, admin, choose_maxclients(opts, conf.channels), bind,
                                   os.path.abspath(opts.socket_dir) if opts.socket_dir else None)
        if time.monotonic() > deadline:
            raise ServerError(f"node {index} of run {opts.id} found no plan {path} from node 0 within {wait:.0f} s; "
                              f"node 0's start failed or {opts.dir} is not the same directory on every node.")
        time.sleep(0.1)


def _await_entries(conf: RunConf, count: int, wait: float) -> list[dict[str, Any]]:
    """Node 0: wait for the entries of nodes 1 to ``count`` - 1 written for this plan; return them in node order."""
    token = plan_token(conf)
    found: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + wait
    while True:
        for k in range(1, count):
            if k in found:
                continue
            path = node_entry_path(conf.dir, conf.id, k)
            if not os.path.lexists(path):
                continue
            try:
                entry = parse_json(read_secure(path, "node entry"), path, "node entry")
            except ConfigError:
                continue  # being replaced
            if isinstance(entry, dict) and entry.get("plan") == token:
                found[k] = {name: entry[name] for name in ("host", "port", "socket", "pid", "ranks", "slots",
                                                            "hostname", "bus_port", "replica_here") if name in entry}
        if len(found) == count - 1:
            return [found[k] for k in range(1, count)]
        if time.monotonic() > deadline:
            missing = [k for k in range(1, count) if k not in found]
            raise ServerError(f"node 0 of run {conf.id} did not hear from node{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(str, missing))} within {wait:.0f} s; see their prolog logs, and check "
                              f"that {conf.dir} is the same directory on every node.")
        time.sleep(0.1)
