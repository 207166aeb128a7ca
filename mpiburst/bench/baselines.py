"""What the benchmark compares mpiburst with: the machine's limits and direct MPI-IO.

Every function here moves the same bytes as the mpiburst measurement (one
:class:`~.patterns.Layout`'s payload on every rank), is timed with
:func:`~.timing.collective_time` (slowest rank), and, when ``check`` is set,
verifies what it wrote or read, returning a verdict agreed by all ranks.

Limits (no mpiburst logic at all):

* :func:`memcpy`: one numpy copy of the rank's payload;
* :func:`tier_ingest` / :func:`tier_readout`: each rank a plain redis-py
  client sending pipelined ``SET`` / ``GET`` of transfer-sized values;
* :func:`bfs_write`: one large-block sequential writer per rank with
  ``fdatasync``, like ``dd bs=8M conv=fdatasync``: the limit of file-per-rank;
* :func:`bfs_shared_write`: the best raw write into one shared file: each
  rank writes its payload as one contiguous domain of the file in 8 MiB
  blocks, then ``fdatasync``: the limit a flush of a shared file is held to.

Peer: :func:`mpiio_write`, ``mpi4py.MPI.File`` on the BFS with ``Write_at`` or
``Write_at_all`` per record, then ``Sync`` and ``Close``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .patterns import Layout, verify_file
from .timing import collective_time

#: Commands and bytes queued per pipeline ``execute`` of the raw tier clients.
PIPELINE_COMMANDS = 64
PIPELINE_BYTES = 64 << 20
#: Block size of the raw BFS writer.
BFS_BLOCK = 8 << 20


def agree(comm: Any, ok: bool) -> bool:
    """Return True only if ``ok`` holds on every rank (collective)."""
    from mpi4py import MPI

    return bool(comm.allreduce(bool(ok), op=MPI.LAND))


def memcpy(comm: Any, data: np.ndarray) -> float:
    """Return the seconds to copy each rank's payload once in memory (the destination is touched beforehand)."""
    dst = np.zeros_like(data)
    seconds, _ = collective_time(comm, lambda: np.copyto(dst, data))
    return seconds


def _batches(n: int, value_bytes: int) -> list[range]:
    """Split ``n`` commands of ``value_bytes`` each into pipeline batches."""
    per = max(1, min(PIPELINE_COMMANDS, PIPELINE_BYTES // max(1, value_bytes)))
    return [range(a, min(n, a + per)) for a in range(0, n, per)]


def raw_keys(tier: Any, stem: str, rank: int, count: int) -> list[bytes]:
    """Return ``count`` keys for a rank's raw baseline values.

    On a multi-node run they carry this node's hash tag, so they stay on the
    rank's own server.
    """
    tag = f"{{{tier.store.tags[tier.store.local]}}}:" if tier.conf.nodes else ""
    return [f"{stem}:{tag}{rank}:{i}".encode() for i in range(count)]


def tier_ingest(comm: Any, client: Any, keys: Sequence[bytes], values: Sequence[bytes]) -> float:
    """Return the seconds for every rank to ``SET`` its values under its keys, pipelined (no transaction)."""
    batches = _batches(len(keys), len(values[0]))

    def phase() -> None:
        for batch in batches:
            pipe = client.pipeline(transaction=False)
            for i in batch:
                pipe.set(keys[i], values[i])
            pipe.execute()

    seconds, _ = collective_time(comm, phase)
    return seconds


def tier_readout(
    comm: Any, client: Any, keys: Sequence[bytes], values: Sequence[bytes], check: bool
) -> tuple[float, bool]:
    """Return the seconds for every rank to ``GET`` its keys back, pipelined, and whether the bytes matched."""
    batches = _batches(len(keys), len(values[0]))

    def phase() -> list[bytes]:
        got: list[bytes] = []
        for batch in batches:
            pipe = client.pipeline(transaction=False)
            for i in batch:
                pipe.get(keys[i])
            got.extend(pipe.execute())
        return got

    seconds, got = collective_time(comm, phase)
    ok = got == list(values) if check else len(got) == len(values)
    return seconds, agree(comm, ok)


def tier_clear(client: Any, keys: Sequence[bytes]) -> None:
    """Delete the raw benchmark keys (not timed)."""
    for batch in _batches(len(keys), PIPELINE_BYTES // PIPELINE_COMMANDS):
        client.delete(*(keys[i] for i in batch))


def bfs_write(comm: Any, path: str, data: np.ndarray, check: bool) -> tuple[float, bool]:
    """Return the seconds for every rank to write its payload to its own file in 8 MiB blocks and fdatasync it.

    The file is removed afterwards; with ``check`` its content is compared first.
    """

    def phase() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = data.data
            pos = 0
            while pos < len(view):
                pos += os.write(fd, view[pos : pos + BFS_BLOCK])
            os.fdatasync(fd)
        finally:
            os.close(fd)

    seconds, _ = collective_time(comm, phase)
    ok = True
    if check:
        with open(path, "rb") as f:
            ok = np.array_equal(np.frombuffer(f.read(), dtype=np.uint8), data)
    os.unlink(path)
    return seconds, agree(comm, ok)


def bfs_shared_write(comm: Any, path: str, data: np.ndarray, check: bool) -> tuple[float, bool]:
    """Return the seconds for every rank to write its payload into its own domain of one shared file.

    Rank ``r`` writes ``[r*S, (r+1)*S)`` in 8 MiB ``pwrite`` blocks and
    ``fdatasync``s; every rank opens the file itself (``O_CREAT``, no
    truncation). The file is removed before and afterwards; with ``check`` each
    rank compares its domain first.
    """
    start = comm.rank * len(data)
    if comm.rank == 0 and os.path.exists(path):
        os.unlink(path)
    comm.Barrier()

    def phase() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = data.data
            pos = 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos : pos + BFS_BLOCK], start + pos)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    seconds, _ = collective_time(comm, phase)
    ok = True
    if check:
        with open(path, "rb") as f:
            f.seek(start)
            ok = np.array_equal(np.frombuffer(f.read(len(data)), dtype=np.uint8), data)
    ok = agree(comm, ok)
    if comm.rank == 0:
        os.unlink(path)
    comm.Barrier()
    return seconds, ok


def remove_output(comm: Any, layout: Layout, path: str) -> None:
    """Remove an output file of ``layout`` (rank 0 for a shared file, each rank its own for nn); collective."""
    if not layout.shared or comm.rank == 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    comm.Barrier()


def mpiio_write(
    comm: Any,
    layout: Layout,
    path: str,
    recs: Sequence[tuple[int, np.ndarray]],
    collective: bool,
    check: bool,
) -> tuple[float, bool]:
    """Return the seconds of direct MPI-IO (Open, a write per record, Sync, Close) and whether the file is right.

    ``collective`` selects ``Write_at_all`` (every rank writes its record ``i``
    in round ``i``) over ``Write_at``. For ``nn`` each rank opens its own file
    on ``COMM_SELF``. The file is removed before and after.
    """
    from mpi4py import MPI

    fcomm = comm if layout.shared else MPI.COMM_SELF
    remove_output(comm, layout, path)

    def phase() -> None:
        f = MPI.File.Open(fcomm, path, MPI.MODE_WRONLY | MPI.MODE_CREATE)
        write = f.Write_at_all if collective else f.Write_at
        for offset, buf in recs:
            write(offset, buf)
        f.Sync()
        f.Close()

    seconds, _ = collective_time(comm, phase)
    ok = agree(comm, verify_file(layout, path)) if check else True
    remove_output(comm, layout, path)
    return seconds, ok
