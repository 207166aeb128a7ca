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
from collections.abc import Sequence
from typing import Any

from . import files

#: (key, label, is a limit) of every method, in table and plot order.
METHODS: tuple[tuple[str, str, bool], ...] = (
    ("memcpy", "memcpy", True),
    ("tier_ingest", "tier raw ingest", True),
    ("tier_readout", "tier raw read-out", True),
    ("bfs_write", "BFS raw write + fsync, file per rank", True),
    ("bfs_shared_write", "BFS raw write + fsync, shared file", True),
    ("mpiio_independent", "MPI-IO Write_at", False),
    ("mpiio_collective", "MPI-IO Write_at_all", False),
    ("mpiburst_write", "mpiburst absorb (Open..Close)", False),
    ("mpiburst_write_unrecorded", "mpiburst absorb, I/O recording off", False),
    ("mpiburst_flush", "mpiburst flush", False),
    ("mpiburst_end_to_end", "mpiburst end-to-end", False),
)
#: (key, label, is a limit) of the checkpoint loop's methods (see :mod:`.ckpt`).
CKPT_METHODS: tuple[tuple[str, str, bool], ...] = (
    ("compute", "work alone, no checkpoint", True),
    ("mpiio_ckpt", "every checkpoint by direct MPI-IO", False),
    ("mpiio_ckpt_1inN", "one checkpoint in N by direct MPI-IO", False),
    ("mpiburst_ckpt", "mpiburst.Checkpoints, one in N flushed in the background", False),
)
#: (key, label) of the checkpoint loop's limits: what bounds any burst buffer over the same tier and BFS.
CKPT_LIMITS: tuple[tuple[str, str], ...] = (
    ("tier_ingest", "every checkpoint SET into the tier by plain redis-py"),
    ("bfs_write", "one checkpoint by raw BFS write + fdatasync"),
)
#: The checkpoint loop's job-time targets against direct MPI-IO writing every checkpoint, by kind of work.
CKPT_TARGET = {"numpy": 0.5, "idle": 0.3}
#: Patterns whose records have their own shape (their own table, targets and plot panel).
_OWN_RECORD = ("ckpt", "files")
#: Transfer sizes below this count as "small records" for the strided target.
SMALL_RECORD = 1 << 20
#: Filesystem types (from /proc/mounts) judged by the network-filesystem targets, set on GlusterFS.
NETWORK_FS = frozenset({"fuse.glusterfs", "glusterfs", "lustre", "gpfs", "nfs", "nfs4", "beegfs", "ceph",
                        "fuse.ceph", "cephfs", "panfs", "wekafs"})


def stats(values: Sequence[float]) -> dict[str, float]:
    """Return median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summarize_ckpt(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON record of one checkpoint loop: per-method job seconds and the ratios."""
    measured = [key for key, _, _ in CKPT_METHODS] + [key for key, _ in CKPT_LIMITS]
    methods = {key: {"seconds": stats(raw["seconds"][key]), "verified": raw["verified"][key]} for key in measured}
    med = {key: methods[key]["seconds"]["median"] for key in methods}
    floor = med["compute"] + med["tier_ingest"] + med["bfs_write"]
    ratios = {
        "job_time_vs_mpiio": med["mpiburst_ckpt"] / med["mpiio_ckpt"],
        "job_time_vs_mpiio_1inN": med["mpiburst_ckpt"] / med["mpiio_ckpt_1inN"],
        "job_time_vs_compute": med["mpiburst_ckpt"] / med["compute"],
        "io_share_of_direct_job": max(0.0, 1 - med["compute"] / med["mpiio_ckpt"]),
        # the work, every checkpoint at the tier's raw ingest, the last one at the BFS's raw speed
        "floor_vs_mpiio": floor / med["mpiio_ckpt"],
        "own_time_vs_floor": (med["mpiburst_ckpt"] - med["compute"]) / (floor - med["compute"]),
    }
    keys = ("pattern", "compute", "flush_every", "transfer", "ranks", "steps", "work_iterations", "work_seconds",
            "bytes_per_rank", "total_bytes")
    return {key: raw[key] for key in keys} | {"methods": methods, "ratios": ratios}


def raw_limit(pattern: str) -> str:
    """Return the method key of the raw BFS write a flush of ``pattern`` is held to (shared file or per rank)."""
    return "bfs_write" if pattern == "nn" else "bfs_shared_write"


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON record of one configuration: per-method seconds and GB/s, ratios, mpiburst details."""
    if raw["pattern"] == "ckpt":
        return _summarize_ckpt(raw)
    if raw["pattern"] == "files":
        return files.summarize(raw)
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
    # absorb bandwidth with recording / without, pair by pair (a pair shares the machine's state)
    recorded = [off / on for on, off in zip(raw["seconds"]["mpiburst_write"], raw["seconds"]["mpiburst_write_unrecorded"])]
    ratios = {
        "absorb_vs_tier_ingest": med["tier_ingest"] / med["mpiburst_write"],
        "flush_vs_bfs_write": med[raw_limit(raw["pattern"])] / med["mpiburst_flush"],
        "write_time_vs_mpiio": med["mpiburst_write"] / direct,
        "end_to_end_time_vs_mpiio": med["mpiburst_end_to_end"] / direct,
        "server_bytes_per_payload_byte": statistics.median(burst["server_bytes"]) / total,
        "absorb_recorded_vs_unrecorded": statistics.median(recorded),   # the pairs' median: robust to drift
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
            "recorded_vs_unrecorded_pairs": recorded,
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


def network(params: dict[str, Any]) -> bool:
    """True when the run's BFS is a network filesystem (judged by the targets set on GlusterFS)."""
    return params.get("bfs", {}).get("type") in NETWORK_FS


def targets(results: Sequence[dict[str, Any]], params: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """Return (description with the figure, met) for each of the issue's targets.

    On a network filesystem (:data:`NETWORK_FS`, from ``params["bfs"]``) the
    strided write-time target is 0.10 instead of 0.50, and time to durable
    data and the checkpoint loop have targets too. ``met`` is None for what
    one run cannot judge (client memory: compare across ``--size``) and for the
    checkpoint loop on a local filesystem (no target there).
    """
    out: list[tuple[str, bool | None]] = []
    net = network(params)
    absorb_1m = {
        r["pattern"]: r["methods"]["mpiburst_write"]["gbps"]["median"]
        for r in results if r["transfer"] == 1 << 20 and r["pattern"] not in _OWN_RECORD
    }
    out += files.targets([r for r in results if r["pattern"] == "files"], net)
    for r in results:
        if r["pattern"] == "files":
            continue
        where = f"{r['pattern']} {short_size(r['transfer'])}"
        ra = r["ratios"]
        small = r["transfer"] < SMALL_RECORD
        if r["pattern"] == "ckpt":
            job, limit = ra["job_time_vs_mpiio"], CKPT_TARGET[r.get("compute", "numpy")]
            out.append((f"{where} ({r['compute']} work): job time / direct MPI-IO every checkpoint = {job:.2f} "
                        f"(<= {limit:.2f}; direct spends {ra['io_share_of_direct_job']:.0%} of its time in I/O; "
                        f"against direct one in {r['flush_every']}: {ra['job_time_vs_mpiio_1inN']:.2f}; the floor of "
                        f"raw tier ingest and one raw BFS write: {ra['floor_vs_mpiio']:.2f})",
                        job <= limit if net else None))
            continue
        out.append((f"{where}: absorb / tier raw ingest = {ra['absorb_vs_tier_ingest']:.2f} (>= 0.80)",
                    ra["absorb_vs_tier_ingest"] >= 0.8))
        if small and r["pattern"] in absorb_1m:
            share = r["methods"]["mpiburst_write"]["gbps"]["median"] / absorb_1m[r["pattern"]]
            out.append((f"{where}: absorb / absorb at 1m = {share:.2f} (>= 0.50)", share >= 0.5))
        rec = ra["absorb_recorded_vs_unrecorded"]
        out.append((f"{where}: absorb with I/O recording / without = {rec:.3f} (>= 0.98)", rec >= 0.98))
        raw = "shared" if raw_limit(r["pattern"]) == "bfs_shared_write" else "file-per-rank"
        out.append((f"{where}: flush / BFS raw {raw} write = {ra['flush_vs_bfs_write']:.2f} (>= 0.90)",
                    ra["flush_vs_bfs_write"] >= 0.9))
        limit = 1.0
        if r["pattern"] == "strided" and small:
            limit = 0.1 if net else 0.5
        out.append((f"{where}: write time / direct MPI-IO = {ra['write_time_vs_mpiio']:.2f} (<= {limit:.2f})",
                    ra["write_time_vs_mpiio"] <= limit))
        if net:
            limit = 0.5 if small else 1.1
            e2e = ra["end_to_end_time_vs_mpiio"]
            out.append((f"{where}: time to durable / direct MPI-IO = {e2e:.2f} (<= {limit:.2f})", e2e <= limit))
        if r["transfer"] == 1 << 20:
            spb = ra["server_bytes_per_payload_byte"]
            out.append((f"{where}: server memory per payload byte = {spb:.2f} (<= 1.10)", spb <= 1.1))
    plain = [r for r in results if r["pattern"] not in _OWN_RECORD]
    if plain:
        peak = max(r["mpiburst"]["client_peak_bytes"]["max"] for r in plain)
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
        f"{ra['absorb_recorded_vs_unrecorded']:.3f}",
        f"{ra['flush_vs_bfs_write']:.2f}",
        f"{ra['write_time_vs_mpiio']:.2f}",
        f"{ra['end_to_end_time_vs_mpiio']:.2f}",
        f"{b['flush_writes']['median']:.0f}",
        short_size(b["flush_median_write_size"]),
        f"{ra['server_bytes_per_payload_byte']:.2f}",
        f"{b['client_peak_bytes']['max'] / (1 << 20):.1f}",
    ]
    return cells


HEADER = ["pattern", "xfer", "memcpy", "ingest", "readout", "bfs", "bfs-sh", "mpiio-i", "mpiio-c", "absorb",
          "abs-norec", "flush", "e2e", "abs/ing", "rec/norec", "fl/bfs", "wr/mpiio", "e2e/mpiio", "writes", "wsize", "srv B/B", "cli MiB"]
CKPT_HEADER = ["work", "xfer", "steps", "compute s", "direct s", "direct 1/N s", "mpiburst s", "ingest s", "bfs 1 s",
               "mpiburst/direct", "mpiburst/direct 1/N", "floor/direct", "own/floor", "direct I/O share"]

LEGEND = """\
GB/s (10^9 B/s), median of {repeat} runs, {ranks} ranks, {size} per rank; min/max are in the JSON; server {server}.
BFS: {fs}.
limits: memcpy, ingest/readout = tier raw SET/GET pipelined, bfs = one 8 MiB-block writer per rank + fdatasync,
each its own file; bfs-sh = the same into one shared file, each rank its own contiguous domain.
peer: mpiio-i = MPI.File Write_at, mpiio-c = Write_at_all (each + Sync + Close).
mpiburst: absorb = Open..Close, flush = mpiburst.sync, e2e = both; abs-norec = absorb with I/O recording off.
abs/ing = absorb / ingest bandwidth; rec/norec = absorb / abs-norec bandwidth (median of the repeats' pairs); fl/bfs = flush / bfs-sh bandwidth (nn: / bfs); wr/mpiio and e2e/mpiio = time over the
faster direct MPI-IO; writes and wsize = BFS write calls of the flush and their median size; srv B/B = server
memory growth per payload byte; cli MiB = largest client RSS growth during the write phase.
'!' after a figure: that method's output was WRONG (verification failed)."""


def text_table(rows: list[list[str]]) -> str:
    """Return rows as aligned text, the first row a header (two text columns, then numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ckpt_cells(r: dict[str, Any]) -> list[str]:
    """Return the table cells of one checkpoint loop."""
    m, ra = r["methods"], r["ratios"]
    cells = [r["compute"], short_size(r["transfer"]), str(r["steps"])]
    for key in [key for key, _, _ in CKPT_METHODS] + [key for key, _ in CKPT_LIMITS]:
        cells.append(f"{m[key]['seconds']['median']:.3f}" + ("" if m[key]["verified"] else "!"))
    return cells + [f"{ra['job_time_vs_mpiio']:.2f}", f"{ra['job_time_vs_mpiio_1inN']:.2f}",
                    f"{ra['floor_vs_mpiio']:.2f}", f"{ra['own_time_vs_floor']:.2f}", f"{ra['io_share_of_direct_job']:.0%}"]


CKPT_LEGEND = """\
checkpoint loop: {steps} steps, each {work_seconds} s of work followed by a checkpoint of {ckpt_size} per rank
(strided records, a new shared file each); job seconds, median of {repeat}. work: numpy = {work_iterations}
single-threaded stencil sweeps on every rank; idle = every rank waits on a timer (CPU idle, as while a GPU computes).
compute = the work alone; direct = every checkpoint by MPI.File Write_at + Sync + Close before the next step;
direct 1/N = the same for checkpoints k % {flush_every} == 0 only; mpiburst = every checkpoint saved through
mpiburst.Checkpoints (keep=2, flush_every={flush_every}): absorbed, one in {flush_every} flushed by rank 0's thread
while the ranks work, the job ending with close() when every flushed checkpoint is durable on the BFS.
limits: ingest = every checkpoint's records SET into the tier by plain redis-py (pipelined, kept); bfs 1 = one
checkpoint by raw BFS write + fdatasync (each rank its domain, 8 MiB blocks). floor = compute + ingest + bfs 1, about
the least a burst buffer over this tier and BFS can take; own/floor = (mpiburst - compute) / (ingest + bfs 1);
direct I/O share = 1 - compute / direct."""


def describe_fs(bfs: dict[str, Any]) -> str:
    """Return one line naming the BFS's filesystem (type, device, mount point, options)."""
    if not bfs:
        return "unknown"
    return f"{bfs['type']} on {bfs['device']} mounted at {bfs['mount']} ({bfs['options']})"


def table(results: Sequence[dict[str, Any]], params: dict[str, Any]) -> str:
    """Return the text table of all configurations with its legend and the targets' status."""
    plain = [r for r in results if r["pattern"] not in _OWN_RECORD]
    ckpt = [r for r in results if r["pattern"] == "ckpt"]
    many = [r for r in results if r["pattern"] == "files"]
    lines = [text_table([HEADER] + [_cells(r) for r in plain]), ""] if plain else []
    lines += [LEGEND.format(fs=describe_fs(params.get("bfs", {})), **params)]
    if many:
        lines += ["", text_table([files.HEADER] + [files.cells(r) for r in many]), "", files.LEGEND.format(**params)]
    if params.get("drain"):
        lines += ["drain on (MPIBURST_DRAIN=1): full chunks written to the BFS while the file is written."]
    if ckpt:
        lines += ["", text_table([CKPT_HEADER] + [_ckpt_cells(r) for r in ckpt]), "", CKPT_LEGEND.format(**params)]
    net = "network filesystem targets" if network(params) else "local filesystem targets"
    lines += ["", f"targets ({net}):"]
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


def _label(params: dict[str, Any], machine: dict[str, Any]) -> str:
    """Return a run's plot label: its BFS type, ranks and size per rank."""
    fs = params.get("bfs", {}).get("type") or machine.get("bfs", {}).get("type", "unknown")
    return f"{fs}, {params['ranks']} ranks, {params['size']} per rank"


def plot(path: str, runs: Sequence[tuple[Sequence[dict[str, Any]], dict[str, Any], dict[str, Any]]]) -> None:
    """Write a PNG with one row of panels per run (``(results, params, machine)``, e.g. one per filesystem).

    A panel per pattern: GB/s against transfer size, one line per method,
    limits dashed, min-max error bars; the checkpoint loop gets a panel of job
    seconds against transfer size, the files pattern one of files/s against file size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = []
    for results, params, machine in runs:
        by_pattern: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            key = f"ckpt ({r.get('compute', 'numpy')} work)" if r["pattern"] == "ckpt" else r["pattern"]
            by_pattern.setdefault(key, []).append(r)
        grouped.append((by_pattern, params, machine))
    ncols = max(len(g[0]) for g in grouped)
    fig, axes = plt.subplots(len(grouped), ncols, figsize=(5.5 * ncols, 5 * len(grouped)), squeeze=False)
    handles: dict[str, Any] = {}
    for row, (by_pattern, params, machine) in zip(axes, grouped):
        for ax in row[len(by_pattern):]:
            ax.set_visible(False)
        for ax, (pattern, rows) in zip(row, by_pattern.items()):
            rows = sorted(rows, key=lambda r: r["transfer"])
            xs = [r["transfer"] for r in rows]
            if pattern == "files":
                handles.update(files.panel(ax, rows))
                ax.set_xticks(xs, [short_size(x) for x in xs])
                ax.set_title(f"many small files, {rows[0]['files_per_rank']} per rank\n{_label(params, machine)}",
                             fontsize="medium")
                continue
            ckpt = pattern.startswith("ckpt")
            unit = "seconds" if ckpt else "gbps"
            for i, (key, label, limit) in enumerate(CKPT_METHODS if ckpt else METHODS):
                if any(key not in r["methods"] for r in rows):   # a run saved before the method existed
                    continue
                g = [r["methods"][key][unit] for r in rows]
                med = [v["median"] for v in g]
                err = [[v["median"] - v["min"] for v in g], [v["max"] - v["median"] for v in g]]
                color = ("black", "tab:red", "tab:orange", "tab:green")[i] if ckpt else f"C{i}"
                line = ax.errorbar(xs, med, yerr=err, label=label, linestyle="--" if limit else "-",
                                   marker="" if limit else "o", capsize=3, color=color)
                handles.setdefault(label, line)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs, [short_size(x) for x in xs])
            ax.set_xlabel("transfer size (bytes per write call)")
            ax.set_ylabel("job time (s), median with min-max" if ckpt else "bandwidth (GB/s), median with min-max")
            title = f"checkpoint loop{pattern[4:]}, {rows[0]['steps']} steps" if ckpt else pattern
            ax.set_title(f"{title}\n{_label(params, machine)}", fontsize="medium")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4 if ncols > 1 else 2,
               fontsize="small")
    fig.tight_layout(rect=(0, 0.25 / len(grouped), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(path: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Read a run's JSON (from ``--json``) as ``(results, params, machine)`` for :func:`plot`."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return doc["results"], doc["params"], doc["machine"]
