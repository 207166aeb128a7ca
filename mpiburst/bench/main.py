"""Drive one benchmark run: every pattern x transfer size, every method, ``repeat`` times.

The methods of one configuration run interleaved within each repeat (limits,
direct MPI-IO, mpiburst, then again), so drift on a shared machine hits them
alike. Outputs are verified on the first repeat. Every file is written in a
scratch directory made on the BFS and removed at the end; the tier is started
once for the whole run, with that directory as its BFS root and its run files
in a local temporary directory.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from .. import drain
from ..collective import on_root
from ..errors import ConfigError
from ..server import connect_redis
from ..sizes import format_size, parse_size
from ..writeback import buffer_size
from . import baselines, burst, ckpt, files, report, view
from . import device as cuda_bench
from .patterns import DEFAULT_PATTERNS, PATTERNS, Layout, rank_data, records

DEFAULT_TRANSFERS = ("4k", "47008", "1m", "16m")
#: The tier must hold one configuration's payload with this much room to spare.
CAPACITY_HEADROOM = 1.25


@dataclass
class Options:
    """What to run (already parsed and checked by :func:`options`)."""

    patterns: list[str]
    transfers: list[int]
    size: int
    repeat: int
    json: str | None
    plot: str | None
    bfs_dir: str
    capacity: str
    server: str | None
    steps: int = 4
    work: float = 0.25
    nfiles: int = files.DEFAULT_FILES
    flush_every: int = 4
    compute: tuple[str, ...] = ckpt.COMPUTE_MODES
    device: str = "host"


def _split(values: list[str] | None, default: tuple[str, ...]) -> list[str]:
    """Return repeated and comma-separated option values as one list, in order, without duplicates."""
    items = [v.strip() for value in (values or default) for v in value.split(",") if v.strip()]
    return list(dict.fromkeys(items))


def options(patterns: list[str] | None, transfers: list[str] | None, size: str, repeat: int,
            json: str | None, plot: str | None, bfs_dir: str, capacity: str, server: str | None,
            steps: int = 4, work: float = 0.25, nfiles: int = files.DEFAULT_FILES, flush_every: int = 4,
            compute: list[str] | None = None, device: str = "host") -> Options:
    """Check the command line's values and return them as :class:`Options` (raises :class:`ConfigError`)."""
    if device == "cuda":
        cuda_bench.check()      # before MPI starts: one sentence when there is no device
    pats = _split(patterns, DEFAULT_PATTERNS)
    for p in pats:
        if p not in PATTERNS:
            raise ConfigError(f"unknown pattern {p!r}; choose from {', '.join(PATTERNS)}.")
    default = files.DEFAULT_SIZES if pats == ["files"] else DEFAULT_TRANSFERS   # small files: their own sizes
    sizes = [parse_size(t, "transfer size") for t in _split(transfers, default)]
    if "files" in pats and nfiles < 1:
        raise ConfigError(f"--files must be at least 1 (got {nfiles}).")
    per_rank = parse_size(size, "--size")
    if min(sizes) <= 0:
        raise ConfigError("a transfer size must be at least 1 byte; give e.g. --transfer 4k.")
    if per_rank < max(sizes) and pats != ["files"]:   # a file's size is its transfer: --size plays no part
        raise ConfigError(
            f"--size {size} is smaller than the largest transfer size ({max(sizes)} bytes); "
            "give a --size of at least one transfer."
        )
    if "ckpt" in pats:
        if steps < 1:
            raise ConfigError(f"--steps must be at least 1 (got {steps}).")
        if not 0 <= work <= 3600:
            raise ConfigError(f"--work must be between 0 and 3600 seconds of work per step (got {work}).")
        if flush_every < 1:
            raise ConfigError(f"--flush-every must be at least 1 (got {flush_every}).")
    modes = _split(compute, ckpt.COMPUTE_MODES)
    for mode in modes:
        if mode not in ckpt.COMPUTE_MODES:
            raise ConfigError(f"unknown --compute {mode!r}; choose from {', '.join(ckpt.COMPUTE_MODES)}.")
    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1 (got {repeat}).")
    if not os.path.isdir(bfs_dir):
        raise ConfigError(f"--bfs-dir {bfs_dir} is not a directory; give an existing directory on the BFS.")
    parse_size(capacity, "--capacity")
    for option, path in (("--json", json), ("--plot", plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(f"{option} {path}: its directory does not exist; create it or give another path.")
    if plot:
        try:
            import matplotlib  # noqa: F401 - only checking that --plot can work
        except ImportError:
            raise ConfigError("--plot needs matplotlib; install it with 'pip install mpiburst[bench]'.") from None
    return Options(pats, sizes, per_rank, repeat, json, plot, os.path.abspath(bfs_dir), capacity, server,
                   steps, work, nfiles, flush_every, tuple(modes), device)


def check_capacity(opts: Options, nranks: int) -> None:
    """Raise :class:`ConfigError` if the tier cannot hold one configuration's payload of ``nranks`` ranks."""
    copies = opts.steps if "ckpt" in opts.patterns else 1  # a checkpoint loop keeps all its checkpoints
    largest = opts.size * nranks * copies
    what = f"{copies} checkpoints of {nranks} ranks x {format_size(opts.size)}" if copies > 1 else \
        f"{nranks} ranks x {format_size(opts.size)}"
    if "files" in opts.patterns and opts.nfiles * max(opts.transfers) * nranks > largest:
        largest = opts.nfiles * max(opts.transfers) * nranks
        what = f"{nranks} ranks x {opts.nfiles} files of {format_size(max(opts.transfers))}"
    if largest * CAPACITY_HEADROOM > parse_size(opts.capacity):
        raise ConfigError(
            f"--capacity {opts.capacity} cannot hold {what} with room to spare; give --capacity "
            f"{-(-2 * largest // (1 << 30))}G, a smaller --size or fewer --files."
        )


def filesystem(path: str) -> dict[str, str]:
    """Return the type, device, mount point and mount options of the filesystem holding ``path``.

    From /proc/mounts: the entry with the longest mount point containing
    ``path`` (the last one when a mount point is mounted over).
    """
    best = {"type": "unknown", "device": "unknown", "mount": "", "options": ""}
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                mnt = mnt.replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mount"]):
                    best = {"type": fstype, "device": dev, "mount": mnt, "options": opts}
    except OSError:
        pass
    return best


def machine(opts: Options, admin: Any) -> dict[str, Any]:
    """Describe the machine, software and filesystem the figures come from."""
    import mpi4py
    import numpy
    from mpi4py import MPI

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = admin.info("server")
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory": format_size(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "server": f"{info.get('server_name', 'redis')} {info.get('valkey_version', info.get('redis_version'))}",
        "bfs": filesystem(opts.bfs_dir),
    }


def _run_config(comm: Any, tier: Any, admin: Any, client: Any, layout: Layout, repeat: int,
                scratch: str) -> dict[str, Any]:
    """Measure every method on ``layout`` ``repeat`` times; return the raw dict :mod:`.report` expects."""
    data = rank_data(layout)
    recs = records(layout, data)
    values = [bytes(buf) for _, buf in recs]  # a plain client sends bytes; built before timing
    keys = baselines.raw_keys(tier, "bench-raw", layout.rank, layout.count)
    stem = f"{layout.pattern}-{layout.transfer}"
    direct = {kind: os.path.join(scratch, "direct", layout.file_name(f"{stem}-{kind}"))
              for kind in ("independent", "collective")}
    raw_file = os.path.join(scratch, "raw", f"{layout.rank}.dat")
    raw_shared = os.path.join(scratch, "raw", "shared.dat")

    seconds: dict[str, list[float]] = {key: [] for key, _, _ in report.METHODS}
    verified: dict[str, bool] = {}
    samples: list[burst.BurstSample] = []
    for i in range(repeat):
        check = i == 0
        seconds["memcpy"].append(baselines.memcpy(comm, data))
        seconds["tier_ingest"].append(baselines.tier_ingest(comm, client, keys, values))
        s, verified["tier_readout"] = baselines.tier_readout(comm, client, keys, values, check)
        seconds["tier_readout"].append(s)
        baselines.tier_clear(client, keys)
        s, ok = baselines.bfs_write(comm, raw_file, data, check)
        seconds["bfs_write"].append(s)
        verified["bfs_write"] = verified.get("bfs_write", True) and ok
        s, ok = baselines.bfs_shared_write(comm, raw_shared, data, check)
        seconds["bfs_shared_write"].append(s)
        verified["bfs_shared_write"] = verified.get("bfs_shared_write", True) and ok
        for kind, path in direct.items():
            s, ok = baselines.mpiio_write(comm, layout, path, recs, kind == "collective", check)
            seconds[f"mpiio_{kind}"].append(s)
            verified[f"mpiio_{kind}"] = verified.get(f"mpiio_{kind}", True) and ok
        if i % 2:  # recording's cost: an absorb with recording off, before or after the recorded one in turn
            seconds["mpiburst_write_unrecorded"].append(burst.absorb_unrecorded(comm, layout, recs, stem))
        sample = burst.measure(comm, tier, admin, layout, recs, stem, check)
        if not i % 2:
            seconds["mpiburst_write_unrecorded"].append(burst.absorb_unrecorded(comm, layout, recs, stem))
        samples.append(sample)
        seconds["mpiburst_write"].append(sample.write)
        seconds["mpiburst_flush"].append(sample.flush)
        seconds["mpiburst_end_to_end"].append(sample.write + sample.flush)
    for key in ("mpiburst_write", "mpiburst_flush", "mpiburst_end_to_end"):
        verified[key] = all(s.ok for s in samples)
    return {
        "pattern": layout.pattern,
        "transfer": layout.transfer,
        "ranks": layout.nranks,
        "bytes_per_rank": layout.rank_bytes,
        "total_bytes": layout.total_bytes,
        "seconds": seconds,
        "verified": verified,
        "mpiburst": {
            "flush_bytes": [s.flush_bytes for s in samples],
            "flush_writes": [s.flush_writes for s in samples],
            "write_sizes": samples[0].write_sizes,  # the same plan on every repeat
            "client_peak": [s.client_peak for s in samples],
            "server_bytes": [s.server_bytes for s in samples],
        },
    }


def _scratch(comm: Any, bfs_dir: str) -> tuple[str, str]:
    """Make the run's scratch directories on rank 0 and return (data dir on the BFS, tier run dir) on every rank.

    The tier's run dir (conf, log, unix socket) goes to the local temporary
    directory: a socket path must stay under 108 bytes, and the tier hands its
    conf to the other ranks itself.
    """
    def make() -> tuple[str, str]:
        data = tempfile.mkdtemp(prefix="mpiburst-bench-", dir=bfs_dir)
        for sub in ("bfs/bench", "direct", "raw"):
            os.makedirs(os.path.join(data, sub), mode=0o700)
        return data, tempfile.mkdtemp(prefix="mpiburst-bench-run-")

    return on_root(comm, make)   # a failure on rank 0 (a full disk, say) raises on every rank


def run(opts: Options) -> int:
    """Run the benchmark on ``MPI.COMM_WORLD``; rank 0 prints the table and writes JSON and plot.

    Returns 0, or 1 when some method wrote or read wrong bytes (the figures are
    still printed, marked with ``!``). Collective: every rank must call it,
    after :func:`check_capacity` passed.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    params: dict[str, Any] = {
        "ranks": comm.size,
        "size": format_size(opts.size),
        "size_bytes": opts.size,
        "repeat": opts.repeat,
        "patterns": opts.patterns,
        "transfers": opts.transfers,
        "capacity": opts.capacity,
        "write_buffer": buffer_size(),
        "drain": drain.enabled(),
        "command": shlex.join(["mpiexec", "-n", str(comm.size), "mpiburst", *sys.argv[1:]]),
        "bfs": filesystem(opts.bfs_dir),
    }
    if "files" in opts.patterns:
        params["files_per_rank"] = opts.nfiles
    if "ckpt" in opts.patterns:
        params |= {"steps": opts.steps, "work_seconds": opts.work, "ckpt_size": format_size(opts.size),
                   "flush_every": opts.flush_every, "compute": list(opts.compute)}
    scratch, rundir = _scratch(comm, opts.bfs_dir)
    if opts.device == "cuda":
        return _run_cuda(comm, opts, params, scratch, rundir)
    results = []
    views: list[dict[str, Any]] = []
    try:
        with burst.start_tier(comm, os.path.join(scratch, "bfs"), opts.capacity, rundir, opts.server) as tier:
            admin = tier.admin() if comm.rank == 0 else None
            # the raw baselines' own plain connection, to this rank's node's server on a multi-node run
            client = connect_redis(tier.conf.node(tier.store.local) if tier.conf.nodes else tier.conf)
            for pattern in opts.patterns:
                if pattern == "ckpt":  # the same work in every method and size: calibrated once
                    params["work_iterations"] = ckpt.calibrate(comm, opts.work) if "numpy" in opts.compute else 0
                for transfer in opts.transfers:
                    if pattern == "ckpt":   # one record per kind of work
                        for mode in opts.compute:
                            layout = ckpt.checkpoint_layout(transfer, opts.size, comm.size, comm.rank)
                            loop = ckpt.Loop(layout, opts.steps, params["work_iterations"], opts.flush_every, mode,
                                             opts.work)
                            raw = ckpt.run_config(comm, tier, client, loop, opts.repeat, scratch)
                            if comm.rank == 0:
                                results.append(report.summarize(raw))
                                print(f"done: ckpt {report.short_size(transfer)} ({mode} work)", file=sys.stderr,
                                      flush=True)
                        continue
                    if pattern == "view":   # its own table: Write_at against a view, same run
                        raw = view.run_config(comm, tier, Layout("strided", transfer, opts.size, comm.size,
                                                                  comm.rank), opts.repeat)
                        if comm.rank == 0:
                            views.append(view.summarize(raw))
                            print(f"done: view {report.short_size(transfer)}", file=sys.stderr, flush=True)
                        continue
                    if pattern == "files":
                        raw = files.run_config(comm, tier, files.Files(transfer, opts.nfiles, comm.size, comm.rank),
                                               opts.repeat, scratch, client)
                    else:
                        layout = Layout(pattern, transfer, opts.size, comm.size, comm.rank)
                        raw = _run_config(comm, tier, admin, client, layout, opts.repeat, scratch)
                    if comm.rank == 0:
                        results.append(report.summarize(raw))
                        print(f"done: {pattern} {report.short_size(transfer)}", file=sys.stderr, flush=True)
            about = on_root(comm, lambda: machine(opts, admin))
            params["server"] = about["server"]
            if tier.conf.nodes and tier.conf.replicas:   # did the burst drop a replica into a full resync?
                params["sync_full"] = on_root(comm, lambda: full_resyncs(tier.conf))
            client.close()
    finally:
        if comm.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(rundir, ignore_errors=True)
    def publish() -> int:
        if views:
            params["view"] = views
            print(view.table(views, opts.repeat) + ("\n" if results else ""))
        if results or not views:
            print(report.table(results, params))
        if opts.json:
            report.write_json(opts.json, results, params, about)
        if opts.plot:
            report.plot(opts.plot, [(results, params, about)])
        bad = [f"{r['pattern']} {report.short_size(r['transfer'])} {k}"
               for r in results for k, m in r["methods"].items() if not m["verified"]]
        bad += [f"view {report.short_size(r['transfer'])} {k}" for r in views for k, ok in r["verified"].items()
                if not ok]
        if bad:
            print(f"mpiburst bench: wrong output from: {', '.join(bad)}; these figures are worthless.", file=sys.stderr)
            return 1
        return 0

    return on_root(comm, publish)   # rank 0 reports (an unwritable --json raises on every rank)


def full_resyncs(conf: Any) -> list[int]:
    """Return each node's ``sync_full`` (``INFO stats``): the full copies its server sent a replica.

    The first is its replica's initial copy; any more means a burst dropped
    the replica (its output buffer overflowed) and it had to copy it all again.
    """
    counts = []
    for k in range(len(conf.nodes)):
        client = connect_redis(conf.node(k))
        try:
            counts.append(int(client.info("stats").get("sync_full", 0)))
        finally:
            client.close()
    return counts


def _run_cuda(comm: Any, opts: Options, params: dict[str, Any], scratch: str, rundir: str) -> int:
    """``--device cuda``: device to tier against host to tier and the copy limit (:mod:`.device`)."""
    cp = cuda_bench.check()
    try:
        with burst.start_tier(comm, os.path.join(scratch, "bfs"), opts.capacity, rundir, opts.server):
            rows = cuda_bench.run(comm, cp, opts.transfers, opts.size, opts.repeat)
    finally:
        if comm.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(rundir, ignore_errors=True)

    runtime = cuda_bench.runtime_name()

    def publish() -> int:
        print(cuda_bench.table(rows, comm.size, opts.size, opts.repeat, runtime))
        if opts.json:
            params["device"] = {"kind": "cuda", "runtime": runtime}
            with open(opts.json, "w", encoding="utf-8") as f:
                json.dump({"params": params, "device_rows": rows}, f, indent=2)
        if not all(r["verified"] for r in rows):
            print("mpiburst bench: wrong output from the device runs (marked !); these figures are worthless.",
                  file=sys.stderr)
            return 1
        return 0

    return on_root(comm, publish)
