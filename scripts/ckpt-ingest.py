"""One checkpoint into the tier: ``mpiburst.File`` against raw ingest of the same bytes, same server, same run.

Run it with the project's python on 2 ranks (docs/benchmarks.md, "Checkpoints
through mpiburst.Checkpoints", where its figures are)::

    PYTHONPATH=. mpiexec -n 2 python scripts/ckpt-ingest.py [--server BIN] [--repeat 7]

Each rank holds ``--size`` bytes (default 16 MiB) in records of 47,008 B and
of 1 MiB, strided as ``mpiburst bench --pattern ckpt`` writes them, and puts
them into one server (started here, stopped at the end) five ways, in turn,
``--repeat`` times; the tier is emptied between rounds (untimed):

* ``mpiburst.File``: ``Open``, ``Write_at`` per record, ``Sync``, ``Close``
  (the checkpoint's absorb: one copy into the 4 MiB write-back buffer, each
  batch sent from it with one ``SET`` and the index script);
* ``redis-py SET/record``: a plain redis-py client, one ``SET`` per record,
  pipelined 64 at a time (the benchmark's ``ingest`` limit);
* ``redis-py SET 4MiB``: the same bytes as 4 MiB values (mpiburst's batch
  size), one pipeline;
* ``redis-py APPEND/record``: every record appended to one key, pipelined;
* ``socket SET 4MiB``: 4 MiB ``SET``s sent from the caller's memory with no
  copy, one in flight at a time: the server's own ingest, nothing else.

It prints the median time of the slowest rank for all ranks' bytes and the
rate, with min and max.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile

from mpi4py import MPI

import mpiburst
from mpiburst.bench import burst
from mpiburst.bench.patterns import Layout, rank_data, records
from mpiburst.bench.timing import collective_time
from mpiburst.server.connection import connect_redis
from mpiburst.sizes import parse_size
from mpiburst.store.resp import resp_frames

BATCH = (4 << 20) - 64   # a write-back batch's payload (mpiburst.writeback: the buffer less BLOB_SLACK)


def ways(comm, client, transfer: int, size: int) -> dict:
    """Return the five ways of putting this rank's records into the server, each a function of the round."""
    rank = comm.rank
    lay = Layout("strided", transfer, size, comm.size, rank)
    recs = records(lay, rank_data(lay))
    values = [bytes(b) for _, b in recs]      # a plain client sends bytes; built before timing
    blob = b"".join(values)
    chunks = [memoryview(blob)[i:i + BATCH] for i in range(0, len(blob), BATCH)]
    conn = client.connection_pool.get_connection()

    def file(i: int) -> None:
        f = mpiburst.File.Open(comm, f"burst://ingest-{transfer}-{i}.dat", MPI.MODE_WRONLY | MPI.MODE_CREATE)
        for off, buf in recs:
            f.Write_at(off, buf)
        f.Sync()
        f.Close()

    def pipelined(command: str, key, items) -> None:
        for a in range(0, len(items), 64):
            pipe = client.pipeline(transaction=False)
            for j in range(a, min(a + 64, len(items))):
                pipe.execute_command(command, key(j), items[j])
            pipe.execute()

    def socket(i: int) -> None:
        for j, chunk in enumerate(chunks):
            conn.send_packed_command(resp_frames([("SET", f"s:{rank}:{i}:{j}", chunk)]), check_health=False)
            conn.read_response()

    return {
        "mpiburst.File": file,
        "redis-py SET/record": lambda i: pipelined("SET", lambda j: f"r:{rank}:{i}:{j}", values),
        "redis-py SET 4MiB": lambda i: pipelined("SET", lambda j: f"c:{rank}:{i}:{j}", [bytes(c) for c in chunks]),
        "redis-py APPEND/record": lambda i: pipelined("APPEND", lambda j: f"a:{rank}:{i}", values),
        "socket SET 4MiB": socket,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", help="server binary (default: as mpiburst finds one)")
    parser.add_argument("--size", default="16m", help="bytes per rank (default 16m)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    size = parse_size(args.size, "--size")
    root = comm.bcast(tempfile.mkdtemp(prefix="ckpt-ingest-") if comm.rank == 0 else None)
    if comm.rank == 0:
        for sub in ("bfs", "run"):
            os.mkdir(os.path.join(root, sub), 0o700)
    comm.Barrier()
    try:
        with burst.start_tier(comm, os.path.join(root, "bfs"), "2G", os.path.join(root, "run"), args.server) as tier:
            client = connect_redis(tier.conf)
            if comm.rank == 0:
                info = client.info("server")
                print(f"server {info.get('server_name', 'redis')} {info.get('valkey_version', info['redis_version'])}, "
                      f"{comm.size} ranks, {args.size} each, median of {args.repeat}")
            for transfer in (47008, 1 << 20):
                fns = ways(comm, client, transfer, size)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for i in range(args.repeat):
                    for name, fn in fns.items():
                        times[name].append(collective_time(comm, lambda: fn(i))[0])  # noqa: B023 - called at once
                    for prefix in ("r", "c", "a", "s"):
                        keys = list(client.scan_iter(match=f"{prefix}:{comm.rank}:*"))
                        if keys:
                            client.delete(*keys)
                    comm.Barrier()
                    if comm.rank == 0:
                        mpiburst.File.Delete(f"burst://ingest-{transfer}-{i}.dat")
                    comm.Barrier()
                if comm.rank == 0:
                    total = size * comm.size
                    print(f"  {transfer} B records:")
                    for name, ts in times.items():
                        med = statistics.median(ts)
                        print(f"    {name:24s} {med * 1e3:6.1f} ms  {total / med / 1e9:5.2f} GB/s   "
                              f"min {min(ts) * 1e3:.1f}  max {max(ts) * 1e3:.1f}")
            client.close()
    finally:
        if comm.rank == 0:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
