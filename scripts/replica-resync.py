"""Does a burst drop a lagging replica into a full resync? mpiburst's replica buffer against the server default.

    PYTHONPATH=. .venv/bin/python scripts/replica-resync.py [--burst 384m] [--capacity 512m] [--server PATH]

Starts a run of 3 nodes with ``replicas=1`` on this machine (the servers in
this process, ``server.start_cluster``), stops node 1's replica (SIGSTOP: a
replica that cannot keep up, as behind a slow link), writes ``--burst``
bytes through the cluster store as node 1's process does (4 MiB batches),
resumes the replica and waits for it to confirm every write (``WAIT 1``).
Then prints node 1's ``sync_full`` (``INFO stats``: full copies sent to its
replica; the first is the initial copy) and the seconds the catch-up took.
The writer keeps the whole burst unconfirmed (``RESEND_BYTES`` raised for
this run: a real writer would wait for its replica every 64 MiB).
Done twice: with mpiburst's setting (``client-output-buffer-limit replica
max(capacity, 256 MiB) 0 0``) and with the server's default
(``replica 256mb 64mb 60``), set for that run only by replacing the line in
the generated config.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mpiburst import server  # noqa: E402
from mpiburst.server import config  # noqa: E402
from mpiburst.server.connection import connect_store  # noqa: E402
from mpiburst.sizes import parse_size  # noqa: E402
from mpiburst.store import cluster_store  # noqa: E402

BATCH = 4 << 20
SERVER_DEFAULT = "client-output-buffer-limit replica 256mb 64mb 60"


def one(setting: str, burst: int, capacity: str, binary: str | None, work: Path) -> tuple[int, int, float]:
    """Run the burst under ``setting`` ("mpiburst" or "default"); return node 1's sync_full before and after, and
    the seconds from resuming the replica until it confirmed every write."""
    mine = config.replication_settings
    if setting == "default":
        def server_default(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return [SERVER_DEFAULT if line.startswith("client-output-buffer-limit") else line
                    for line in mine(*args, **kwargs)]
        config.replication_settings = server_default
    try:
        conf = server.start_cluster(nodes=3, id=f"rs{setting[0]}", dir=str(work), capacity=capacity, channels=3,
                                    tied=True, replicas=1, **({"server": binary} if binary else {}))
    finally:
        config.replication_settings = mine
    try:
        store, _ = connect_store(conf, 1)
        primary = server.connect_redis(conf.node(1))
        before = int(primary.info("stats")["sync_full"])
        replica_pid = conf.nodes[1]["replica"]["pid"]
        store.create("/burst", None)
        data = os.urandom(BATCH)
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            for k in range(burst // BATCH):
                store.commit("/burst", 0, data, [(k * BATCH, 0, BATCH)])
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        t0 = time.monotonic()
        store.confirm(timeout=300)
        took = time.monotonic() - t0
        after = int(primary.info("stats")["sync_full"])
        primary.close()
        store.close()
        return before, after, took
    finally:
        server.stop_run(conf, discard=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", default="384m", help="bytes written while the replica is stopped (default 384m)")
    parser.add_argument("--capacity", default="512m", help="each node's capacity (default 512m)")
    parser.add_argument("--server", default=None, help="server binary (default: mpiburst's discovery)")
    args = parser.parse_args()
    burst = parse_size(args.burst)
    # the whole burst unconfirmed: a writer otherwise waits for its replica every RESEND_BYTES (the replica is
    # stopped here, so that wait would fail after 10 s); this measures the server's buffer alone
    cluster_store.RESEND_BYTES = 2 * burst
    work = Path(tempfile.mkdtemp(prefix="mpiburst-resync-", dir="/tmp"))
    try:
        for setting in ("mpiburst", "default"):
            before, after, took = one(setting, burst, args.capacity, args.server, work)
            print(f"{setting:8}  burst {burst >> 20} MiB behind a stopped replica: node 1 sync_full {before} -> "
                  f"{after} ({after - before} full resync{'s' if after - before != 1 else ''}), caught up in "
                  f"{took:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
