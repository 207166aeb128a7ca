"""The cost of TLS on a multi-node tier: mpiburst bench across 3 simulated hosts, mutual TLS against plaintext.

    sudo PYTHONPATH=. .venv/bin/python scripts/bench-tls.py [--pairs 3] [--size 16m] [--server /usr/bin/redis-server]

Makes 3 hosts with separate network stacks (tests/netns.py: network
namespaces on a bridge, 127.77.0.k, one hostname each; root only) and runs
``mpiburst bench --pattern segmented --transfer 1m`` on 6 ranks, 2 per host,
in pairs: one run with mutual TLS (the default), one with
``MPIBURST_TRUST_NETWORK=1`` (plaintext TCP), alternating which goes first.
Prints absorb and flush per run, their medians and the ratio TLS/plaintext.
Every rank writes to its own host's server over its unix socket, so what
TLS can cost is the traffic between hosts: the flush reading other nodes'
records and extents, the engine on node 0, the cluster bus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from netns import Hosts  # noqa: E402


def _gbps(summary: dict, method: str) -> float:
    return float(summary["methods"][method]["gbps"]["median"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--size", default="16m", help="bytes per rank per measurement (default 16m)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", default="/usr/bin/redis-server")
    args = parser.parse_args()
    hosts = Hosts(3).up()
    work = Path(tempfile.mkdtemp(prefix="mpiburst-bench-tls-"))
    rows: dict[str, list[tuple[float, float]]] = {"tls": [], "plaintext": []}
    try:
        for pair in range(args.pairs):
            order = ["tls", "plaintext"] if pair % 2 == 0 else ["plaintext", "tls"]
            for mode in order:
                out = work / f"{mode}-{pair}.json"
                env = hosts.env(1, MPIBURST_RANKS_PER_NODE="2", PYTHONPATH=str(REPO))
                env.pop("MPIBURST_TRUST_NETWORK", None)
                if mode == "plaintext":
                    env["MPIBURST_TRUST_NETWORK"] = "1"
                command = [*hosts.mpiexec_argv(2, 3), sys.executable, "-m", "mpiburst", "bench", "--pattern",
                           "segmented", "--transfer", "1m", "--size", args.size, "--repeat", str(args.repeat),
                           "--capacity", "1G", "--server", args.server, "--bfs-dir", str(work), "--json", str(out)]
                done = hosts.run(1, command, env, timeout=900, cwd=work)
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    return 1
                (summary,) = [s for s in json.loads(out.read_text())["results"] if s.get("pattern") == "segmented"]
                absorb, flush = _gbps(summary, "mpiburst_write"), _gbps(summary, "mpiburst_flush")
                rows[mode].append((absorb, flush))
                print(f"pair {pair} {mode:9s} absorb {absorb:.3f} GB/s  flush {flush:.3f} GB/s", flush=True)
    finally:
        hosts.down()
        shutil.rmtree(work, ignore_errors=True)
    med = {m: (statistics.median(a for a, _ in r), statistics.median(f for _, f in r)) for m, r in rows.items()}
    for mode, (absorb, flush) in med.items():
        print(f"median {mode:9s} absorb {absorb:.3f} GB/s  flush {flush:.3f} GB/s")
    print(f"TLS / plaintext: absorb {med['tls'][0] / med['plaintext'][0]:.2f}  flush "
          f"{med['tls'][1] / med['plaintext'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
