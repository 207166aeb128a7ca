"""Turn the benchmark's raw timings into figures: statistics, ratios, targets, table, JSON, plot.

Input is one *raw* dict per configuration (pattern x transfer size), built by
:mod:`.main` on rank 0::

    {"pattern", "transfer", "ranks", "bytes_per_rank", "total_bytes",
     "seconds": {method: [s, ...]},          # one entry per repeat
     "verified": {method: bool},
     "mpiburst": {"flush_bytes": [...], "flush_writes": [...], "write_sizes": {size: count},
                  "client_peak": [...], "server_bytes": [...]}}

Bandwidths are payload bytes / seconds of the slowest rank, in GB/s (10^9
bytes per second); each figure is the median over repeats with min and max.
"""

from __future__ import annotations

import json
import statistics
from typing import Any, Iterable, Sequence

#: (key, label, is a limit) of every method, in table and plot order.
METHODS: tuple[tuple[str, str, bool], ...] = (
    ("memcpy", "memcpy", True),
    ("tier_ingest", "tier raw ingest", True),
    ("tier_readout", "tier raw read-out", True),
    ("bfs_write", "BFS raw write + fsync", True),
    ("mpiio_independent", "MPI-IO Write_at", False),
    ("mpiio_collective", "MPI-IO Write_at_all", False),
    ("mpiburst_write", "mpiburst absorb (Open..Close)", False),
    ("mpiburst_flush", "mpiburst flush", False),
    ("mpiburst_end_to_end", "mpiburst end-to-end", False),
)
#: Transfer sizes below this count as "small records" for the strided target.
SMALL_RECORD = 1 << 20


def stats(values: Sequence[float]) -> dict[str, float]:
    """Return median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON record of one configuration: per-method seconds and GB/s, ratios, mpiburst details."""
    total = raw["total_bytes"]
    methods = {}
    for key, _, _ in METHODS:
        secs = raw["seconds"][key]
        methods[key] = {
            "seconds": stats(secs),
            "gbps": stats([total / s / 1e9 for s in secs]),
            "verified": raw["verified"].get(key, True),
        }
    med = {key: methods[key]["seconds"]["median"] for key in methods}
    direct = min(med["mpiio_independent"], med["mpiio_collective"])
    burst = raw["mpiburst"]
    ratios = {
        "absorb_vs_tier_ingest": med["tier_ingest"] / med["mpiburst_write"],
        "flush_vs_bfs_write": med["bfs_write"] / med["mpiburst_flush"],
        "write_time_vs_mpiio": med["mpiburst_write"] / direct,
        "end_to_end_time_vs_mpiio": med["mpiburst_end_to_end"] / direct,
        "server_bytes_per_payload_byte": statistics.median(burst["server_bytes"]) / total,
    }
    sizes = burst["write_sizes"]
    return {
        key: raw[key] for key in ("pattern", "transfer", "ranks", "bytes_per_rank", "total_bytes")
    } | {
        "methods": methods,
        "ratios": ratios,
        "mpiburst": {
            "flush_bytes": stats(burst["flush_bytes"]),
            "flush_writes": stats(burst["flush_writes"]),
            "flush_write_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "flush_median_write_size": _median_of_histogram(sizes),
            "client_peak_bytes": stats(burst["client_peak"]),
            "server_bytes": stats(burst["server_bytes"]),
        },
    }


def _median_of_histogram(hist: dict[int, int]) -> int:
    """Return the median write size of a size->count histogram (0 when empty)."""
    n = sum(hist.values())
    seen = 0
    for size, count in sorted(hist.items()):
        seen += count
        if 2 * seen >= n:
            return size
    return 0


def short_size(n: int) -> str:
    """Return a transfer size the way it is typed on the command line (``4k``, ``47008``, ``1m``)."""
    for unit, shift in (("g", 30), ("m", 20), ("k", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def targets(results: Sequence[dict[str, Any]], params: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """Return (description with the figure, met) for each of the issue's targets.

    ``met`` is None for the client-memory target, which one run cannot judge:
    compare the figure across runs with different ``--size``.
    """
    out: list[tuple[str, bool | None]] = []
    absorb_1m = {
        r["pattern"]: r["methods"]["mpiburst_write"]["gbps"]["median"] for r in results if r["transfer"] == 1 << 20
    }
    for r in results:
        where = f"{r['pattern']} {short_size(r['transfer'])}"
        ra = r["ratios"]
        out.append((f"{where}: absorb / tier raw ingest = {ra['absorb_vs_tier_ingest']:.2f} (>= 0.80)",
                    ra["absorb_vs_tier_ingest"] >= 0.8))
        if r["transfer"] < SMALL_RECORD and r["pattern"] in absorb_1m:
            share = r["methods"]["mpiburst_write"]["gbps"]["median"] / absorb_1m[r["pattern"]]
            out.append((f"{where}: absorb / absorb at 1m = {share:.2f} (>= 0.50)", share >= 0.5))
        out.append((f"{where}: flush / BFS raw write = {ra['flush_vs_bfs_write']:.2f} (>= 0.90)",
                    ra["flush_vs_bfs_write"] >= 0.9))
        limit = 0.5 if r["pattern"] == "strided" and r["transfer"] < SMALL_RECORD else 1.0
        out.append((f"{where}: write time / direct MPI-IO = {ra['write_time_vs_mpiio']:.2f} (<= {limit:.2f})",
                    ra["write_time_vs_mpiio"] <= limit))
        if r["transfer"] == 1 << 20:
            spb = ra["server_bytes_per_payload_byte"]
            out.append((f"{where}: server memory per payload byte = {spb:.2f} (<= 1.10)", spb <= 1.1))
    if results:
        peak = max(r["mpiburst"]["client_peak_bytes"]["max"] for r in results)
        out.append((f"client peak memory growth {peak / (1 << 20):.1f} MiB with a {params['write_buffer'] / (1 << 20):.1f} "
                    f"MiB write-back buffer and {params['size']} per rank (must not grow with --size)", None))
    return out


def _cells(r: dict[str, Any]) -> list[str]:
    """Return the table cells of one configuration."""
    cells = [r["pattern"], short_size(r["transfer"])]
    for key, _, _ in METHODS:
        m = r["methods"][key]
        cells.append(f"{m['gbps']['median']:.3f}" + ("" if m["verified"] else "!"))
    ra, b = r["ratios"], r["mpiburst"]
    cells += [
        f"{ra['absorb_vs_tier_ingest']:.2f}",
        f"{ra['flush_vs_bfs_write']:.2f}",
        f"{ra['write_time_vs_mpiio']:.2f}",
        f"{ra['end_to_end_time_vs_mpiio']:.2f}",
        f"{b['flush_writes']['median']:.0f}",
        short_size(b["flush_median_write_size"]),
        f"{ra['server_bytes_per_payload_byte']:.2f}",
        f"{b['client_peak_bytes']['max'] / (1 << 20):.1f}",
    ]
    return cells


HEADER = ["pattern", "xfer", "memcpy", "ingest", "readout", "bfs", "mpiio-i", "mpiio-c", "absorb", "flush",
          "e2e", "abs/ing", "fl/bfs", "wr/mpiio", "e2e/mpiio", "writes", "wsize", "srv B/B", "cli MiB"]

LEGEND = """\
GB/s (10^9 B/s), median of {repeat} runs, {ranks} ranks, {size} per rank; min/max are in the JSON; server {server}.
limits: memcpy, ingest/readout = tier raw SET/GET pipelined, bfs = one 8 MiB-block writer per rank + fdatasync.
peer: mpiio-i = MPI.File Write_at, mpiio-c = Write_at_all (each + Sync + Close).
mpiburst: absorb = Open..Close, flush = mpiburst.sync, e2e = both.
abs/ing = absorb / ingest bandwidth; fl/bfs = flush / bfs bandwidth; wr/mpiio and e2e/mpiio = time over the
faster direct MPI-IO; writes and wsize = BFS write calls of the flush and their median size; srv B/B = server
memory growth per payload byte; cli MiB = largest client RSS growth during the write phase.
'!' after a figure: that method's output was WRONG (verification failed)."""


def table(results: Sequence[dict[str, Any]], params: dict[str, Any]) -> str:
    """Return the text table of all configurations with its legend and the targets' status."""
    rows = [HEADER] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", LEGEND.format(**params), "", "targets:"]
    verdict = {True: "met   ", False: "MISSED", None: "info  "}
    lines += [f"  {verdict[met]}  {text}" for text, met in targets(results, params)]
    return "\n".join(lines)


def write_json(path: str, results: Sequence[dict[str, Any]], params: dict[str, Any], machine: dict[str, Any]) -> None:
    """Write the run's parameters, machine description, results and targets as JSON."""
    doc = {
        "params": params,
        "machine": machine,
        "results": list(results),
        "targets": [{"target": text, "met": met} for text, met in targets(results, params)],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def plot(path: str, results: Iterable[dict[str, Any]], params: dict[str, Any]) -> None:
    """Write a PNG: GB/s against transfer size, one panel per pattern, one line per method, limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_pattern: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_pattern.setdefault(r["pattern"], []).append(r)
    fig, axes = plt.subplots(1, len(by_pattern), figsize=(6 * len(by_pattern), 6), squeeze=False, sharey=True)
    for ax, (pattern, rows) in zip(axes[0], by_pattern.items()):
        rows = sorted(rows, key=lambda r: r["transfer"])
        xs = [r["transfer"] for r in rows]
        for key, label, limit in METHODS:
            g = [r["methods"][key]["gbps"] for r in rows]
            med = [v["median"] for v in g]
            err = [[v["median"] - v["min"] for v in g], [v["max"] - v["median"] for v in g]]
            ax.errorbar(xs, med, yerr=err, label=label, linestyle="--" if limit else "-",
                        marker="" if limit else "o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [short_size(x) for x in xs])
        ax.set_xlabel("transfer size (bytes per write call)")
        ax.set_title(f"{pattern}, {params['ranks']} ranks, {params['size']} per rank")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("bandwidth (GB/s), median with min-max")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize="small")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
