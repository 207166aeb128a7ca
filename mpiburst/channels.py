"""mem_io's channel workflow on the tier: many small tasks append to channels, one job reads them back.

A run has ``channels`` channels, numbered ``0 .. channels-1``. A task
appends its output (a stream) to one channel with :func:`store`; at the end
:func:`retrieve` reads every channel back in channel order. mem_io's rules,
kept exactly:

* one writer per channel at a time: :func:`store` opens the channel
  atomically (``SET NX`` of its writer key) and fails with
  :class:`~mpiburst.errors.ChannelBusyError` (mem_io's exit 24) if it is open;
  closing it makes it *closed*, and a closed channel can be stored to again
  (the data is appended);
* a channel left open by a crashed writer is reset with :func:`reset`;
* reading is non-destructive; open and empty channels are reported.

The channels live in the run's store (:meth:`mpiburst.store.Store.channel_open`
and the other ``channel_*`` methods), which owns their layout.

Cost: a store sends one RPUSH per ``CHUNK`` (1 MiB) of input, pipelined
``PIPELINE`` at a time; a retrieve reads ``BATCH`` pieces per LRANGE, so each
piece crosses the network exactly once and a channel of *n* pieces costs
``ceil(n / BATCH)`` round trips: linear in its length (mem_io's retrieve
issued one LINDEX per 1 KiB chunk, which walks the list: quadratic).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import ChannelBusyError, ChannelError, TierFullError
from .perms import create_aside, current_umask, give_final_attrs
from .store import Store
from .tier import Tier

#: Largest piece of a channel's data in one list element.
CHUNK = 1 << 20
#: Pieces sent per pipelined round trip by a store.
PIPELINE = 8
#: Pieces fetched per LRANGE by a retrieve (at most BATCH * CHUNK bytes per reply).
BATCH = 64


@dataclass
class ChannelInfo:
    """The state of one channel: ``open``, ``closed`` or ``unused``, and its size in bytes."""

    channel: int
    state: str
    bytes: int
    stores: int


def check(tier: Tier, channel: int) -> int:
    """Return ``channel`` if it is a channel of the run, else raise :class:`ChannelError` (exit 21)."""
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < tier.channels:
        raise ChannelError(f"channel {channel} does not exist: run {tier.id} has channels 0 to {tier.channels - 1}.")
    return channel


def store(tier: Tier, channel: int, stream: BinaryIO) -> int:
    """Append everything read from ``stream`` to ``channel``; return the bytes stored.

    Raises
    ------
    ChannelError
        If the channel is out of range (exit 21).
    ChannelBusyError
        If another writer has the channel open (exit 24).
    TierFullError
        If the tier is full; what was stored before stays and the channel is closed.
    """
    check(tier, channel)
    store = tier.store
    token = store.channel_open(channel)
    if token is None:
        raise ChannelBusyError(
            f"channel {channel} of run {tier.id} is open (another writer is storing to it); wait for it, "
            f"or reset the channel with 'mpiburst channel-reset --channel {channel}' if that writer crashed.")
    total = 0
    try:
        pieces: list[bytes] = []
        while True:
            piece = stream.read(CHUNK)
            if piece:
                pieces.append(piece)
                total += len(piece)
            if not piece or len(pieces) == PIPELINE:
                _append(store, channel, pieces, stored=not piece)
                pieces = []
            if not piece:
                break
    finally:
        store.channel_close(channel, token)
    return total


def _append(store: Store, channel: int, pieces: list[bytes], stored: bool) -> None:
    try:
        store.channel_append(channel, pieces, stored=stored)
    except TierFullError:
        raise TierFullError("the tier is full; retrieve and reset channels, or start the run with a larger "
                            "--capacity.") from None


def info(tier: Tier, channel: int | None = None) -> list[ChannelInfo]:
    """Return the state of every channel (or of one), in channel order, in one round trip."""
    chans = list(range(tier.channels)) if channel is None else [check(tier, channel)]
    out = []
    for c, st in zip(chans, tier.store.channel_states(chans)):
        state = "open" if st.open else "closed" if st.bytes or st.stores else "unused"
        out.append(ChannelInfo(c, state, st.bytes, st.stores))
    return out


def read(tier: Tier, channel: int, batch: int = BATCH) -> Iterator[bytes]:
    """Yield the bytes of ``channel`` in pieces, ``batch`` list elements per round trip (non-destructive)."""
    check(tier, channel)
    start = 0
    while True:
        pieces = tier.store.channel_read(channel, start, batch)
        yield from pieces
        if len(pieces) < batch:
            return
        start += batch


def reset(tier: Tier, channel: int | None = None) -> list[int]:
    """Close the channels left open by crashed writers (all, or one); return those that were open.

    Their data is kept; a channel reset while a writer is still running keeps
    what that writer stores, but the one-writer rule no longer protects it.
    """
    chans = list(range(tier.channels)) if channel is None else [check(tier, channel)]
    return [c for c, was_open in zip(chans, tier.store.channel_reset(chans)) if was_open]


def retrieve(tier: Tier, out: BinaryIO, channel: int | None = None, print_id: bool = False, sep: str = " ",
             warn: Callable[[str], None] | None = None) -> int:
    """Write channels to ``out`` in channel order (or one channel), mem_io style; return the bytes written.

    Each non-empty channel is followed by a newline; with ``print_id`` it is
    preceded by its number and ``sep``. Open and empty channels are reported
    to ``warn`` (open ones are still read: their data so far).
    """
    total = 0
    for c in _report(info(tier, channel), warn):
        if c.bytes == 0:
            continue
        if print_id:
            out.write(f"{c.channel}{sep}".encode())
        for piece in read(tier, c.channel):
            out.write(piece)
            total += len(piece)
        out.write(b"\n")
    out.flush()
    return total


def split(tier: Tier, directory: str, warn: Callable[[str], None] | None = None) -> list[str]:
    """Write each channel to ``directory/data_<id>_<C>.dat`` (C zero-padded to the digits of the count).

    Files hold exactly the channel's bytes (no newline added). Each is written
    in a private (0600) temporary file, which gets the mode a direct
    ``open(O_CREAT, 0666)`` by this process would give (``0666 & ~umask``, a
    default ACL of ``directory``; an existing file's mode, owner and group are
    kept, see :mod:`mpiburst.perms`) before it is renamed into place, as
    mem_io's retrieve wrote them. Returns their paths.
    """
    width = len(str(tier.channels))
    umask = current_umask()
    paths = []
    for c in _report(info(tier), warn):
        path = os.path.join(directory, f"data_{tier.id}_{c.channel:0{width}d}.dat")
        tmp = os.path.join(directory, f".data_{tier.id}_{c.channel:0{width}d}.{secrets.token_hex(6)}.tmp")
        create_aside(tmp)
        try:
            with open(tmp, "r+b") as f:
                for piece in read(tier, c.channel):
                    f.write(piece)
                f.flush()
                mine = give_final_attrs(f.fileno(), path, umask)
            if mine:
                os.replace(tmp, path)
            else:                       # another user's file this process may write: rewrite it in place
                shutil.copyfile(tmp, path)
                os.unlink(tmp)
        except BaseException:
            os.unlink(tmp)
            raise
        paths.append(path)
    return paths


def _report(channels: list[ChannelInfo], warn: Callable[[str], None] | None) -> list[ChannelInfo]:
    """Pass ``channels`` through, telling ``warn`` about open and empty ones."""
    if warn is not None:
        for c in channels:
            if c.state == "open":
                warn(f"channel {c.channel} is open (a writer is running, or crashed: reset it with channel-reset)")
            elif c.bytes == 0:
                warn(f"channel {c.channel} is empty")
    return channels


def any_data(tier: Tier) -> bool:
    """Return True if any channel of the run holds data or is open."""
    return any(c.state != "unused" for c in info(tier))
