"""The view pattern: the strided records written through a file view, compared with ``Write_at`` in the same run.

Real MPI-IO codes describe their part of a shared file once, as a filetype,
and write it with collective calls. Here the ``strided`` layout (record ``i``
of rank ``r`` at ``(i*N + r)*T``) becomes a view: displacement ``r*T`` and a
vector filetype of ``m`` records (``m`` blocks of ``T`` bytes, ``N*T``
apart, resized to ``m*N*T`` so the tiles follow each other); each *round*
writes ``m`` records (:data:`ROUND_BYTES` per rank) with one ``Write_all``,
the file pointer moving on through the tiles. Two ways, interleaved in each
repeat (and taking turns at going first) so the machine's drift hits both alike:

* ``write_at``: ``mpiburst.File`` with ``Write_at`` per record (what the
  other patterns do), then ``Sync``;
* ``view``: ``mpiburst.File`` with the view and one ``Write_all`` per round,
  then ``Sync``.

Each is then flushed (``mpiburst.sync``) and, on the first repeat, the BFS
file is verified byte for byte. The figures: absorb bandwidth (payload over
the slowest rank's write time), the view's over ``Write_at``'s, the flush
bandwidth, and the index entries the tier holds for the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..collective import on_root
from .baselines import agree
from .burst import URL_DIR, absorb_records
from .patterns import Layout, rank_data, records, verify_file
from .timing import collective_time

#: Bytes each rank writes per ``Write_all`` (one round): whole records, at least one.
ROUND_BYTES = 8 << 20
#: The two ways, in the order they run within a repeat.
METHODS = ("write_at", "view")


def round_records(layout: Layout) -> int:
    """Return the records each rank writes per round (per ``Write_all``)."""
    return max(1, min(layout.count, ROUND_BYTES // layout.transfer))


def filetype(layout: Layout) -> tuple[Any, int]:
    """Return the committed filetype of one round of ``layout`` (the caller frees it) and its records."""
    from mpi4py import MPI

    per = round_records(layout)
    vec = MPI.BYTE.Create_vector(per, layout.transfer, layout.nranks * layout.transfer)
    tile = vec.Create_resized(0, per * layout.nranks * layout.transfer).Commit()
    vec.Free()
    return tile, per


def _absorb_view(comm: Any, url: str, layout: Layout, data: np.ndarray) -> None:
    """Write the rank's records through the view: Open, Set_view, one Write_all per round, Sync, Close."""
    from mpi4py import MPI

    import mpiburst

    tile, per = filetype(layout)
    try:
        f = mpiburst.File.Open(comm, url, MPI.MODE_WRONLY | MPI.MODE_CREATE)
        f.Set_view(layout.rank * layout.transfer, MPI.BYTE, tile)
        step = per * layout.transfer
        for start in range(0, layout.rank_bytes, step):
            f.Write_all(data[start:start + step])
        f.Sync()
        f.Close()
    finally:
        tile.Free()


def _entries(store: Any, path: str) -> int:
    """Return the number of index entries the tier holds for ``path`` (a strided run counts one)."""
    return len(store.extents_from(path, 0, 1 << 24))


def run_config(comm: Any, tier: Any, layout: Layout, repeat: int) -> dict[str, Any]:
    """Measure both ways on ``layout`` (``strided``) ``repeat`` times; return the raw figures (collective)."""
    import mpiburst

    data = rank_data(layout)
    recs = records(layout, data)
    seconds: dict[str, list[float]] = {f"{m}_{phase}": [] for m in METHODS for phase in ("absorb", "flush")}
    entries: dict[str, int] = {}
    verified = {m: True for m in METHODS}
    for i in range(repeat):
        for method in METHODS if i % 2 == 0 else METHODS[::-1]:   # each goes first as often
            name = f"{URL_DIR}/view-{layout.transfer}-{method}.dat"
            url = f"burst://{name}"
            if method == "view":
                absorb, _ = collective_time(comm, lambda: _absorb_view(comm, url, layout, data))  # noqa: B023 - called at once
            else:
                absorb, _ = collective_time(comm, lambda: absorb_records(comm, url, recs))  # noqa: B023 - called at once
            entries[method] = _entries(tier.store, os.path.join(tier.bfs_root, name)) if comm.rank == 0 else 0
            flush, _ = collective_time(comm, lambda: mpiburst.sync(url, comm=comm))  # noqa: B023 - called at once
            seconds[f"{method}_absorb"].append(absorb)
            seconds[f"{method}_flush"].append(flush)
            if i == 0:
                verified[method] = agree(comm, verify_file(layout, os.path.join(tier.bfs_root, name)))
            on_root(comm, lambda: mpiburst.File.Delete(url))  # noqa: B023 - called at once
    return {"pattern": "view", "transfer": layout.transfer, "ranks": layout.nranks,
            "bytes_per_rank": layout.rank_bytes, "total_bytes": layout.total_bytes,
            "round_records": round_records(layout), "seconds": seconds, "entries": entries,
            "verified": verified}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Return medians (GB/s) of both ways and the view's absorb over ``Write_at``'s."""
    total = raw["total_bytes"]
    gbps = {key: total / float(np.median(values)) / 1e9 for key, values in raw["seconds"].items()}
    return {**{k: raw[k] for k in ("pattern", "transfer", "ranks", "bytes_per_rank", "round_records",
                                    "entries", "verified", "seconds")},
            "gbps": gbps, "absorb_ratio": gbps["view_absorb"] / gbps["write_at_absorb"],
            "flush_ratio": gbps["view_flush"] / gbps["write_at_flush"]}


HEADER = ["transfer", "records/round", "absorb Write_at", "absorb view", "view/Write_at", "flush Write_at",
          "flush view", "index entries (Write_at / view)"]


def table(results: Sequence[dict[str, Any]], repeat: int) -> str:
    """Return the text table of the view pattern's results (GB/s, medians of ``repeat``)."""
    from .report import short_size, text_table

    rows = [HEADER]
    for r in results:
        g = r["gbps"]
        bad = "" if all(r["verified"].values()) else " !"
        rows.append([short_size(r["transfer"]), str(r["round_records"]), f"{g['write_at_absorb']:.3f}", f"{g['view_absorb']:.3f}{bad}",
                     f"{r['absorb_ratio']:.2f}", f"{g['write_at_flush']:.3f}", f"{g['view_flush']:.3f}",
                     f"{r['entries'].get('write_at', 0)} / {r['entries'].get('view', 0)}"])
    legend = ("view pattern: the strided records through a vector-filetype view, one Write_all per round "
              f"(records/round per rank), against Write_at per record; GB/s, median of {repeat}; "
              "'!' = wrong bytes on the BFS.")
    return "\n".join([text_table(rows), "", legend])
