"""Where each rank's records go in the benchmark, and what bytes the files must hold.

Three IOR-style access patterns, for ``N`` ranks each writing ``count`` records
of ``T`` bytes (``S = count * T`` bytes per rank):

* ``segmented``: one shared file; rank ``r`` writes the contiguous block
  ``[r*S, (r+1)*S)``, record ``i`` at ``r*S + i*T``;
* ``strided``: one shared file; record ``i`` of rank ``r`` at ``(i*N + r)*T``
  (the ranks' records interleave, so each rank's writes are scattered);
* ``nn``: one file per rank; record ``i`` at ``i*T`` in rank ``r``'s file.

The content of every file is a function of the file offset alone (a random
tape of a period that divides no transfer size, repeated), so a record written
at the wrong offset, twice, or not at all is detected by :func:`verify_file`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

#: Where the records of one file (or one file per rank) go.
LAYOUTS = ("segmented", "strided", "nn")
#: What ``--pattern`` takes: the layouts, the checkpoint loop (:mod:`.ckpt`, strided checkpoints), the
#: strided records through a file view against ``Write_at`` (:mod:`.view`) and many small files (:mod:`.files`).
PATTERNS = LAYOUTS + ("ckpt", "view", "files")
#: What runs without ``--pattern``.
DEFAULT_PATTERNS = LAYOUTS + ("ckpt",)

#: Period of the content tape: odd and just below 1 MiB, so no power-of-two
#: shift or transfer size maps a record onto the bytes of another one.
_PERIOD = (1 << 20) - 17
#: Bytes read at a time when verifying a file.
_VERIFY_CHUNK = 8 << 20


@dataclass(frozen=True)
class Layout:
    """The records of one rank for one pattern, transfer size and rank count.

    Attributes
    ----------
    pattern
        One of :data:`LAYOUTS`.
    transfer
        Bytes per record (one write call).
    size
        Requested bytes per rank; rounded down to a whole number of records.
    nranks, rank
        The communicator's size and this process's rank.
    """

    pattern: str
    transfer: int
    size: int
    nranks: int
    rank: int

    def __post_init__(self) -> None:
        if self.pattern not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.pattern!r}; choose from {', '.join(LAYOUTS)}.")
        if self.transfer <= 0:
            raise ConfigError("the transfer size must be at least 1 byte; give e.g. --transfer 4k.")
        if self.size < self.transfer:
            raise ConfigError(
                f"--size ({self.size} bytes per rank) is smaller than the transfer size ({self.transfer} bytes); "
                "give a --size of at least one transfer."
            )

    @property
    def count(self) -> int:
        """Number of records each rank writes."""
        return self.size // self.transfer

    @property
    def rank_bytes(self) -> int:
        """Bytes each rank writes (``count * transfer``)."""
        return self.count * self.transfer

    @property
    def total_bytes(self) -> int:
        """Bytes all ranks write together: the payload every method moves."""
        return self.rank_bytes * self.nranks

    @property
    def shared(self) -> bool:
        """True when all ranks write one file (segmented, strided), False for file-per-rank."""
        return self.pattern != "nn"

    @property
    def file_bytes(self) -> int:
        """Size of each output file once every record is written."""
        return self.total_bytes if self.shared else self.rank_bytes

    def file_name(self, stem: str) -> str:
        """Return the name of this rank's output file for a method called ``stem``."""
        return f"{stem}.dat" if self.shared else f"{stem}.{self.rank}.dat"

    def offsets(self) -> np.ndarray:
        """Return the file offset of each of this rank's records, in write order."""
        i = np.arange(self.count, dtype=np.int64)
        if self.pattern == "segmented":
            return self.rank * self.rank_bytes + i * self.transfer
        if self.pattern == "strided":
            return (i * self.nranks + self.rank) * self.transfer
        return i * self.transfer

    def _seed(self) -> int:
        """Seed of the content tape: one per shared file, one per rank's file for nn."""
        return 0 if self.shared else 1 + self.rank


@functools.lru_cache(maxsize=8)
def _tape(seed: int) -> np.ndarray:
    """Return two periods of the random content tape for ``seed`` (so any period-long slice is a view)."""
    one = np.random.default_rng(seed).integers(0, 256, _PERIOD, dtype=np.uint8)
    return np.concatenate([one, one])


def expected(layout: Layout, offset: int, length: int) -> np.ndarray:
    """Return the bytes ``[offset, offset + length)`` of ``layout``'s output file must hold."""
    tape = _tape(layout._seed())
    start = offset % _PERIOD
    if length <= _PERIOD:
        return tape[start : start + length]
    return np.resize(tape[start : start + _PERIOD], length)


def rank_data(layout: Layout) -> np.ndarray:
    """Return this rank's payload: record ``i`` is ``data[i*T:(i+1)*T]``, the bytes it must write at ``offsets()[i]``."""
    if layout.pattern != "strided":  # the rank's records are contiguous in its file
        return np.array(expected(layout, int(layout.offsets()[0]), layout.rank_bytes))
    data = np.empty(layout.rank_bytes, dtype=np.uint8)
    t = layout.transfer
    for i, off in enumerate(layout.offsets().tolist()):
        data[i * t : (i + 1) * t] = expected(layout, off, t)
    return data


def records(layout: Layout, data: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Return ``(offset, buffer)`` for each record, built before timing so every method pays the same."""
    t = layout.transfer
    return [(off, data[i * t : (i + 1) * t]) for i, off in enumerate(layout.offsets().tolist())]


def verify_file(layout: Layout, path: str) -> bool:
    """Check this rank's share of an output file against the expected bytes.

    For a shared file, rank ``r`` checks the contiguous slice
    ``[r*S, (r+1)*S)`` (so all ranks together check the whole file, whatever the
    pattern); for ``nn`` each rank checks its own file. The file size must be
    exactly :attr:`Layout.file_bytes`. Returns False on any difference or if the
    file is missing.
    """
    start = layout.rank * layout.rank_bytes if layout.shared else 0
    end = start + layout.rank_bytes
    try:
        if os.path.getsize(path) != layout.file_bytes:
            return False
        buf = np.empty(_VERIFY_CHUNK, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            pos = start
            while pos < end:
                n = f.readinto(buf.data[: min(_VERIFY_CHUNK, end - pos)])
                if not n or not np.array_equal(buf[:n], expected(layout, pos, n)):
                    return False
                pos += n
    except FileNotFoundError:
        return False
    return True
