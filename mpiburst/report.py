"""A run's I/O report: what the application wrote and read through mpiburst, what the flush wrote to the BFS.

:func:`build` turns the tier's statistics (:meth:`mpiburst.store.Store.stats`:
counters merged at each close, one event per flush, the engine's tier-fill
samples and sync / purge events, see :mod:`mpiburst.iostats`) into one
JSON-serialisable dict; :func:`summary` renders it for a terminal and
:func:`html` as one self-contained page whose plots are inline SVG.
"""

from __future__ import annotations

import html as _html
import json
import math
import os
import time
from typing import Any

from .iostats import BINS, size_bin
from .runconf import write_secure
from .sizes import format_size
from .store import Store

_DIRECTIONS = ("write", "read")
_PATTERN = ("consecutive", "sequential", "other")


def build(store: Store, run: str = "") -> dict[str, Any]:
    """Return the report of the run whose tier is ``store`` (see ``docs/report.md`` for every field)."""
    return from_stats(store.stats(), run)


def from_stats(stats: tuple[dict[str, Any], list[dict[str, Any]]], run: str = "") -> dict[str, Any]:
    """Return the report of a run's statistics as :meth:`mpiburst.store.Store.stats` returns them."""
    counters, log = stats
    flushes = [e for e in log if e.get("kind") == "flush"]
    paths = sorted(set(counters) | {e["path"] for e in flushes})
    files = [_file(path, counters.get(path, {}), [e for e in flushes if e["path"] == path]) for path in paths]
    missing = sorted({n for e in log if e.get("kind") == "missing" for n in e["nodes"]})
    network = next((e for e in reversed(log) if e.get("kind") == "network"), None)
    return {"run": run, "generated": time.time(), "bins": list(BINS), "files": files, "flushes": flushes,
            "timeline": _timeline(log), "missing_nodes": missing,
            "network": None if network is None else {"tls": bool(network.get("tls"))},
            "totals": {"app_write_calls": sum(f["app"]["write"]["calls"] for f in files),
                       "app_write_bytes": sum(f["app"]["write"]["bytes"] for f in files),
                       "app_read_calls": sum(f["app"]["read"]["calls"] for f in files),
                       "app_read_bytes": sum(f["app"]["read"]["bytes"] for f in files),
                       "bfs_write_calls": sum(f["bfs"]["writes"] for f in files),
                       "bfs_write_bytes": sum(f["bfs"]["bytes"] for f in files)}}


def write_beside(report: dict[str, Any], directory: str, run_id: str) -> tuple[str, str]:
    """Write ``report`` as ``mpiburst_<id>.report.json`` and ``.report.html`` in ``directory`` (0600); return both paths."""
    base = os.path.join(directory, f"mpiburst_{run_id}.report")
    write_secure(f"{base}.json", json.dumps(report, indent=1) + "\n")
    write_secure(f"{base}.html", html(report))
    return f"{base}.json", f"{base}.html"


def _file(path: str, by_process: dict[str, dict[str, int]], flushes: list[dict[str, Any]]) -> dict[str, Any]:
    app = {d: _direction(d, by_process.values()) for d in _DIRECTIONS}
    processes = {who: {f"{d}_{k}": c.get(f"{d}_{k}", 0) for d in _DIRECTIONS for k in ("calls", "bytes", "ns")}
                 for who, c in sorted(by_process.items(), key=lambda item: _process_key(item[0]))}
    hist = [0] * len(BINS)
    sizes: dict[str, int] = {}
    for e in flushes:
        for size, count in e["sizes"].items():
            hist[size_bin(int(size))] += count
            sizes[size] = sizes.get(size, 0) + count
    writes = sum(e["writes"] for e in flushes)
    bfs = {"flushes": len(flushes), "writes": writes, "bytes": sum(e["bytes"] for e in flushes),
           "seconds": sum(e["seconds"] for e in flushes),
           "aligned_writes": sum(e["aligned_writes"] for e in flushes),
           "align": sorted({e["align"] for e in flushes}), "hist": hist,
           "sizes": dict(sorted(sizes.items(), key=lambda item: int(item[0])))}
    calls = app["write"]["calls"]
    return {"path": path, "app": app, "processes": processes, "bfs": bfs,
            "write_call_reduction": calls / writes if writes else None}


def _timeline(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the run over time: absorb and flush bandwidth, tier fill, the engine's events.

    Times are seconds since ``start`` (the first sample or event, wall clock).
    Absorb is the server's received bytes between two fill samples; flush
    spreads each flush's bytes evenly over its duration. Both are lists of
    ``{"from", "to", "bytes_per_second"}`` intervals.
    """
    fill = sorted((e for e in log if e.get("kind") == "fill"), key=lambda e: e["t"])
    flushes = [e for e in log if e.get("kind") == "flush"]
    events = sorted((e for e in log if e.get("kind") in ("sync", "purge", "prestage")), key=lambda e: e["t"])
    times = [e["t"] for e in fill] + [e["start"] for e in flushes] + [e["t"] for e in events]
    start = min(times, default=0.0)
    absorb = [{"from": a["t"] - start, "to": b["t"] - start,
               "bytes_per_second": max(0, b["net_in"] - a["net_in"]) / (b["t"] - a["t"])}
              for a, b in zip(fill, fill[1:]) if "net_in" in a and "net_in" in b and b["t"] > a["t"]]
    edges = sorted({x for e in flushes for x in (e["start"], e["start"] + e["seconds"])})
    flush = []
    for lo, hi in zip(edges, edges[1:]):
        rate = sum(e["bytes"] / e["seconds"] for e in flushes
                   if e["seconds"] > 0 and e["start"] <= lo and e["start"] + e["seconds"] >= hi)
        flush.append({"from": lo - start, "to": hi - start, "bytes_per_second": rate})
    samples = [{"t": e["t"] - start, **{k: e[k] for k in ("used", "capacity", "dirty_bytes", "dirty_files")}}
               for e in fill]
    return {"start": start, "absorb": absorb, "flush": flush, "fill": samples,
            "events": [{**e, "t": e["t"] - start} for e in events]}


def _direction(d: str, counters: Any) -> dict[str, Any]:
    counters = list(counters)

    def total(name: str) -> int:
        return sum(c.get(f"{d}_{name}", 0) for c in counters)

    ns = [c.get(f"{d}_ns", 0) for c in counters]
    return {"calls": total("calls"), "bytes": total("bytes"),
            "seconds": total("ns") / 1e9, "max_process_seconds": max(ns, default=0) / 1e9,
            **{k: total(k) for k in _PATTERN},
            "hist": [total(f"hist_{i}") for i in range(len(BINS))]}


def _process_key(who: str) -> tuple[str, int]:
    kind, _, number = who.partition(" ")
    return kind, int(number) if number.isdigit() else 0


# -- the terminal -------------------------------------------------------------------
def summary(report: dict[str, Any]) -> str:
    """Return the report as lines for a terminal: per file, the application's I/O against the BFS's."""
    lines = [f"I/O report of run {report['run'] or '?'}: {len(report['files'])} file(s)"]
    missing = report.get("missing_nodes", [])
    if missing:
        lost = ", ".join(map(str, missing))
        lines.append(f"incomplete: the server of node {lost} was down when the run stopped: the counters of its "
                     "processes are missing" + (", and so are every flush and engine event and tier-fill sample "
                                                "(node 0 holds them)" if 0 in missing else ""))
    network = report.get("network")
    if network is not None:
        lines.append("network: the nodes talked mutual TLS (the run's own CA)" if network["tls"] else
                     "network: the nodes talked plaintext TCP, without TLS: the network was declared private to the "
                     "job (--trust-network)")
    if not report["files"]:
        lines.append("  nothing recorded yet (counters reach the tier when files are closed)")
    for f in report["files"]:
        w, r, bfs = f["app"]["write"], f["app"]["read"], f["bfs"]
        lines.append(f"{f['path']}")
        lines.append(f"  application writes: {w['calls']} calls, {format_size(w['bytes'])}, "
                     f"{w['seconds']:.3f} s in mpiburst (longest process {w['max_process_seconds']:.3f} s); "
                     f"consecutive {w['consecutive']}, sequential {w['sequential']}, other {w['other']}")
        if r["calls"]:
            lines.append(f"  application reads:  {r['calls']} calls, {format_size(r['bytes'])}, "
                         f"{r['seconds']:.3f} s in mpiburst")
        if bfs["flushes"]:
            reduction = f"{f['write_call_reduction']:.1f}x fewer write calls" if f["write_call_reduction"] else ""
            lines.append(f"  BFS writes (flush): {bfs['writes']} calls, {format_size(bfs['bytes'])} in "
                         f"{bfs['flushes']} flush(es), {bfs['seconds']:.3f} s, "
                         f"{bfs['aligned_writes']} of {bfs['writes']} a multiple of the alignment "
                         f"{'/'.join(format_size(a) for a in bfs['align'])}; {reduction}".rstrip("; "))
        else:
            lines.append("  BFS writes (flush): none yet")
        lines.append(f"  processes: {len(f['processes'])}")
    tl = report.get("timeline", {})
    if tl.get("fill"):
        peak = max(tl["fill"], key=lambda e: e["used"] / max(e["capacity"], 1))
        lines.append(f"tier: peak fill {format_size(peak['used'])} of {format_size(peak['capacity'])} "
                     f"({peak['used'] / max(peak['capacity'], 1):.0%}) at +{peak['t']:.1f} s, "
                     f"{len(tl['fill'])} samples over {tl['fill'][-1]['t']:.1f} s")
    events = tl.get("events", [])
    if events:
        syncs = [e for e in events if e["kind"] == "sync"]
        purges = [e for e in events if e["kind"] == "purge"]
        lines.append(f"engine: {len(syncs)} sync(s), {len(purges)} purge(s) freeing "
                     f"{format_size(sum(e['bytes'] for e in purges))}, "
                     f"{sum(e['kind'] == 'prestage' for e in events)} prestage(s)")
    return "\n".join(lines)


# -- the page -------------------------------------------------------------------------
_COLOURS = ("#4e79a7", "#f28e2b")
#: Geometry of every plot, in pixels: the page's size, the left and top margins, the drawing area.
_WIDTH, _HEIGHT, _LEFT, _TOP = 760, 300, 70, 40
_INNER_W, _INNER_H = _WIDTH - _LEFT - 20, _HEIGHT - 60 - _TOP


def _frame(title: str, ylabel: str, y_top: float, plot_id: str) -> list[str]:
    """Return the opening SVG elements every plot shares: canvas, title, axes, y label, 0 and ``y_top`` ticks."""
    width, height, left, top, inner_w, inner_h = _WIDTH, _HEIGHT, _LEFT, _TOP, _INNER_W, _INNER_H
    return [f'<svg class="plot" id="{plot_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_html.escape(title)}">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">{_html.escape(title)}</text>',
            f'<line x1="{left}" y1="{top + inner_h}" x2="{left + inner_w}" y2="{top + inner_h}" stroke="black"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + inner_h}" stroke="black"/>',
            f'<text x="14" y="{top + inner_h / 2}" font-size="12" transform="rotate(-90 14 {top + inner_h / 2})" '
            f'text-anchor="middle">{_html.escape(ylabel)}</text>',
            f'<text x="{left - 4}" y="{top + 4}" font-size="11" text-anchor="end">{_number(y_top)}</text>',
            f'<text x="{left - 4}" y="{top + inner_h}" font-size="11" text-anchor="end">0</text>']


def _bars(title: str, labels: list[str], series: list[tuple[str, list[float]]], ylabel: str,
          log: bool = False, plot_id: str = "") -> str:
    """Return one inline SVG bar chart: ``series`` (name, values) as grouped bars over ``labels``."""
    height, left, top, inner_w, inner_h = _HEIGHT, _LEFT, _TOP, _INNER_W, _INNER_H
    peak = max((v for _, values in series for v in values), default=0) or 1

    def scale(v: float) -> float:
        if v <= 0:
            return 0.0
        if log:
            return math.log10(v + 1) / math.log10(peak + 1) * inner_h
        return v / peak * inner_h

    group = inner_w / max(len(labels), 1)
    bar = group * 0.8 / max(len(series), 1)
    out = _frame(title, ylabel + (" (log scale)" if log else ""), peak, plot_id)
    for i, label in enumerate(labels):
        x0 = left + i * group + group * 0.1
        for j, (name, values) in enumerate(series):
            h = scale(values[i])
            out.append(f'<rect class="bar" x="{x0 + j * bar:.1f}" y="{top + inner_h - h:.1f}" width="{bar:.1f}" '
                       f'height="{h:.1f}" fill="{_COLOURS[j % 2]}"><title>{_html.escape(name)} '
                       f'{_html.escape(label)}: {_number(values[i])}</title></rect>')
        out.append(f'<text x="{x0 + group * 0.4:.1f}" y="{top + inner_h + 16}" font-size="11" '
                   f'text-anchor="middle">{_html.escape(label)}</text>')
    for j, (name, _) in enumerate(series):
        y = height - 14
        x = left + j * 200
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{_COLOURS[j % 2]}"/>'
                   f'<text x="{x + 18}" y="{y}" font-size="12">{_html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _lines(title: str, series: list[tuple[str, list[tuple[float, float]]]], xlabel: str, ylabel: str,
           plot_id: str, marks: list[tuple[float, str]] | None = None) -> str:
    """Return one inline SVG line chart: ``series`` (name, points) over a shared x axis; ``marks`` label times."""
    height, left, top, inner_w, inner_h = _HEIGHT, _LEFT, _TOP, _INNER_W, _INNER_H
    xs = [x for _, pts in series for x, _ in pts] + [x for x, _ in marks or []]
    x_hi = max(xs, default=1) or 1
    y_hi = max((y for _, pts in series for _, y in pts), default=0) or 1

    def pos(x: float, y: float) -> str:
        return f"{left + x / x_hi * inner_w:.1f},{top + inner_h - y / y_hi * inner_h:.1f}"

    out = _frame(title, ylabel, y_hi, plot_id)
    out += [f'<text x="{left}" y="{top + inner_h + 16}" font-size="11" text-anchor="middle">0</text>',
           f'<text x="{left + inner_w}" y="{top + inner_h + 16}" font-size="11" text-anchor="middle">'
           f'{_number(x_hi)}</text>',
           f'<text x="{left + inner_w / 2}" y="{top + inner_h + 30}" font-size="12" text-anchor="middle">'
           f'{_html.escape(xlabel)}</text>']
    for x, label in marks or []:
        out.append(f'<line class="mark" x1="{left + x / x_hi * inner_w:.1f}" y1="{top}" '
                   f'x2="{left + x / x_hi * inner_w:.1f}" y2="{top + inner_h}" stroke="#999" stroke-dasharray="3,3">'
                   f'<title>{_html.escape(label)} at +{x:.1f} s</title></line>')
    for j, (name, pts) in enumerate(series):
        if pts:
            out.append(f'<polyline class="line" fill="none" stroke="{_COLOURS[j % 2]}" stroke-width="2" '
                       f'points="{" ".join(pos(x, y) for x, y in pts)}"><title>{_html.escape(name)}</title></polyline>')
        x = left + j * 200
        out.append(f'<rect x="{x}" y="{height - 24}" width="12" height="12" fill="{_COLOURS[j % 2]}"/>'
                   f'<text x="{x + 18}" y="{height - 14}" font-size="12">{_html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _steps(intervals: list[dict[str, float]], scale: float) -> list[tuple[float, float]]:
    """Return ``{"from", "to", "bytes_per_second"}`` intervals as the points of a step line (0 in the gaps)."""
    pts: list[tuple[float, float]] = []
    for seg in intervals:
        if pts and seg["from"] > pts[-1][0]:
            pts += [(pts[-1][0], 0.0), (seg["from"], 0.0)]
        elif not pts and seg["from"] > 0:
            pts.append((0.0, 0.0))
            pts.append((seg["from"], 0.0))
        y = seg["bytes_per_second"] / scale
        pts += [(seg["from"], y), (seg["to"], y)]
    return pts


def _number(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}"


def html(report: dict[str, Any]) -> str:
    """Return the report as one self-contained HTML page (inline SVG plots, no external resource)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mpiburst I/O report "
             f"{_html.escape(report['run'])}</title><style>body{{font-family:sans-serif;margin:2em}}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}</style></head><body>",
             f"<h1>I/O report of run {_html.escape(report['run'] or '?')}</h1>",
             f"<pre>{_html.escape(summary(report))}</pre>"]
    t = report["totals"]
    app_hist = [sum(f["app"]["write"]["hist"][i] for f in report["files"]) for i in range(len(BINS))]
    bfs_hist = [sum(f["bfs"]["hist"][i] for f in report["files"]) for i in range(len(BINS))]
    parts.append("<h2>Write sizes: application vs BFS</h2>")
    parts.append(_bars(f"Write calls per size ({t['app_write_calls']} by the application, "
                       f"{t['bfs_write_calls']} to the BFS)", list(BINS),
                       [("application (into the tier)", app_hist), ("flush (to the BFS)", bfs_hist)],
                       "write calls", log=True, plot_id="plot-sizes"))
    per_process: dict[str, list[float]] = {}
    for f in report["files"]:
        for who, c in f["processes"].items():
            mine = per_process.setdefault(who, [0.0, 0.0])
            mine[0] += c["write_bytes"] / 2**20
            mine[1] += c["read_bytes"] / 2**20
    names = sorted(per_process, key=_process_key)
    parts.append("<h2>Bytes per process</h2>")
    parts.append(_bars("MiB written and read per process", names,
                       [("written", [per_process[n][0] for n in names]),
                        ("read", [per_process[n][1] for n in names])], "MiB", plot_id="plot-ranks"))
    flushes = sorted(report["flushes"], key=lambda e: e["start"])
    if flushes:
        t0 = flushes[0]["start"]
        parts.append("<h2>Flush bandwidth</h2>")
        parts.append(_bars("Flush bandwidth (MiB/s) per flush, by start time", 
                           [f"+{e['start'] - t0:.1f}s" for e in flushes],
                           [("flush", [e["bytes"] / 2**20 / max(e["seconds"], 1e-9) for e in flushes])],
                           "MiB/s", plot_id="plot-flush"))
    tl = report.get("timeline", {})
    if tl.get("absorb") or tl.get("flush"):
        marks = [(e["t"], f"{e['kind']} ({e.get('trigger', '')})") for e in tl.get("events", [])
                 if e["kind"] in ("sync", "purge")]
        parts.append("<h2>Bandwidth over time</h2>")
        parts.append(_lines("Absorb (bytes into the tier) and flush (to the BFS), MiB/s",
                            [("absorb", _steps(tl.get("absorb", []), 2**20)),
                             ("flush", _steps(tl.get("flush", []), 2**20))],
                            "seconds since the run's first sample", "MiB/s", "plot-bandwidth", marks))
    if tl.get("fill"):
        fill = tl["fill"]
        parts.append("<h2>Tier fill over time</h2>")
        parts.append(_lines(f"Tier memory used and dirty data, % of the capacity "
                            f"({format_size(fill[-1]['capacity'])})",
                            [("used", [(e["t"], 100 * e["used"] / max(e["capacity"], 1)) for e in fill]),
                             ("dirty (not yet on the BFS)",
                              [(e["t"], 100 * e["dirty_bytes"] / max(e["capacity"], 1)) for e in fill])],
                            "seconds since the run's first sample", "% of capacity", "plot-fill"))
    parts.append("<h2>Files</h2><table><tr><th>file</th><th>app write calls</th><th>app bytes</th>"
                 "<th>BFS write calls</th><th>BFS bytes</th><th>reduction</th></tr>")
    for f in report["files"]:
        red = f["write_call_reduction"]
        parts.append(f"<tr><td>{_html.escape(f['path'])}</td><td>{f['app']['write']['calls']}</td>"
                     f"<td>{f['app']['write']['bytes']}</td><td>{f['bfs']['writes']}</td><td>{f['bfs']['bytes']}</td>"
                     f"<td>{f'{red:.1f}x' if red else '-'}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)
