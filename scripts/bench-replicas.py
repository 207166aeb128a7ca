"""The cost of replicas on a multi-node tier: mpiburst bench on 6 ranks as 3 nodes, replicas=1 against 0.

    PYTHONPATH=. .venv/bin/python scripts/bench-replicas.py [--pairs 3] [--size 16m] [--server valkey-server]

Runs ``mpiburst bench --pattern segmented --transfer 1m`` under
``mpiexec -n 6`` with ``MPIBURST_RANKS_PER_NODE=2`` (three simulated nodes
on this machine, on loopback) in pairs: one run with ``MPIBURST_REPLICAS=1``,
one with 0, alternating which goes first. Prints absorb (Open..Close, which
with replicas waits for each node's replica: ``WAIT 1``), flush
(``mpiburst.sync``) and end-to-end per run, their medians and the ratio
replicas=1 / replicas=0, and for each replicas=1 run every node's
``sync_full`` (``INFO stats``: full copies sent to its replica; 1 is the
initial copy, more means the burst dropped the replica into a full resync).
On one machine the replication stream shares the cores with the ranks and
the servers; on real nodes it crosses the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = {"absorb": "mpiburst_write", "flush": "mpiburst_flush", "end-to-end": "mpiburst_end_to_end"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--size", default="16m", help="bytes per rank per measurement (default 16m)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", default=None, help="server binary (default: mpiburst's discovery)")
    args = parser.parse_args()
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))
    work = Path(tempfile.mkdtemp(prefix="mpiburst-bench-replicas-"))
    rows: dict[str, list[dict[str, float]]] = {"replicas=1": [], "replicas=0": []}
    try:
        for pair in range(args.pairs):
            order = ["replicas=1", "replicas=0"] if pair % 2 == 0 else ["replicas=0", "replicas=1"]
            for mode in order:
                out = work / f"{mode}-{pair}.json"
                env = dict(os.environ, MPIBURST_RANKS_PER_NODE="2", MPIBURST_REPLICAS=mode[-1],
                           PYTHONPATH=str(REPO))
                command = [mpiexec, "-n", "6", sys.executable, "-m", "mpiburst", "bench", "--pattern", "segmented",
                           "--transfer", "1m", "--size", args.size, "--repeat", str(args.repeat), "--capacity",
                           "512M", "--bfs-dir", str(work), "--json", str(out),
                           *(["--server", args.server] if args.server else [])]
                done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    return 1
                doc = json.loads(out.read_text())
                (summary,) = [s for s in doc["results"] if s.get("pattern") == "segmented"]
                got = {name: float(summary["methods"][m]["gbps"]["median"]) for name, m in METHODS.items()}
                rows[mode].append(got)
                syncs = f"  sync_full per node {doc['params']['sync_full']}" if "sync_full" in doc["params"] else ""
                print(f"pair {pair} {mode}  " + "  ".join(f"{k} {v:.3f} GB/s" for k, v in got.items()) + syncs,
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in METHODS} for mode, runs in rows.items()}
    for mode, got in med.items():
        print(f"median {mode}  " + "  ".join(f"{k} {v:.3f} GB/s" for k, v in got.items()))
    print("replicas=1 / replicas=0:  " + "  ".join(f"{k} {med['replicas=1'][k] / med['replicas=0'][k]:.2f}"
                                                  for k in METHODS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
