"""The Redis wire protocol (RESP) for bulk payloads, without the copies redis-py makes.

redis-py with hiredis copies every argument it sends into one buffer and every
bulk reply it reads into a new ``bytes`` object (about 0.8 GB/s here). The
tier's two bulk paths avoid both: commits send the caller's memory as it is
(:func:`resp_frames`), and fetches receive each reply straight into the
buffer the bytes belong in (:func:`read_bulks_into`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

import hiredis
import redis

#: Arguments longer than this are sent as frames of their own instead of being joined. Up to 64 KiB a copy
#: costs less than the extra sends (a small file's batch in one send: 50 us of CPU against 70 us here, #25).
_JOIN_LIMIT = 65536
#: The argument types sent as they are (any other is packed by hiredis, or as its ``str``).
_BUFFERS = frozenset((bytes, bytearray, memoryview))
#: Replies shorter than this are read many per ``recv`` and copied out; longer ones land directly.
_SMALL = 64 << 10
#: Bytes asked for per ``recv`` while small replies are read.
_READ_AHEAD = 256 << 10


def resp_frames(commands: Iterable[tuple]) -> list[bytes | bytearray | memoryview]:
    """Encode ``commands`` in RESP, passing large payloads through as they are (no copy).

    The frames are meant for ``Connection.send_packed_command``, whose
    ``sendall`` takes each payload straight from the caller's memory.
    """
    frames: list[bytes | bytearray | memoryview] = []
    head: list[bytes | bytearray | memoryview] = []
    for command in commands:
        if _BUFFERS.isdisjoint(map(type, command)):
            # names and numbers (a create, a batch's commit script): hiredis packs them in C, 2 us against 6
            # for a create's 20 (it copies a payload slowly, 25 us for 64 KiB: those are joined below)
            try:
                head.append(hiredis.pack_command(command))
                continue
            except TypeError:   # an argument it does not take (a numpy integer, a bool): packed below
                pass
        head.append(b"*%d\r\n" % len(command))
        for arg in command:
            data: bytes | bytearray | memoryview
            data = arg if isinstance(arg, (bytes, bytearray, memoryview)) else str(arg).encode()
            head.append(b"$%d\r\n" % len(data))
            if len(data) > _JOIN_LIMIT:
                frames.append(b"".join(head))
                frames.append(data)
                head = [b"\r\n"]
            else:
                head += (data, b"\r\n")
    frames.append(b"".join(head))
    return frames


def read_bulks_into(sock: socket.socket, views: Sequence[memoryview]) -> list[int]:
    """Read one RESP reply per view from ``sock``; a bulk string of the view's length lands in it.

    A large payload is received directly into its view (no intermediate
    object); small ones are read many per ``recv`` and copied out, to save
    system calls. A reply of another length (a vanished key reads as an empty
    string) is consumed and discarded, so the connection stays in step. The
    socket must carry nothing but the replies to the commands just sent; the
    reader only waits for bytes while a reply is incomplete, so it cannot
    block on bytes that never come.

    Returns
    -------
    list of int
        The length of each bulk reply as the server sent it (``-1`` for nil).

    Raises
    ------
    redis.ResponseError
        If a reply is an error, after every reply was read.
    redis.ConnectionError
        If the server closed the connection.
    """
    reader = _Reader(sock)
    lengths: list[int] = []
    error: str | None = None
    for i, view in enumerate(views):
        line = reader.line(_ask(len(view)))
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            error = error or rest.decode(errors="replace")
            lengths.append(-1)
            continue
        if kind != b"$":
            raise redis.ResponseError(f"unexpected reply {line[:40]!r} to a bulk read")
        n = int(rest)
        lengths.append(n)
        if n < 0:
            continue
        if n == len(view):
            reader.into(view)
        else:
            reader.skip(n)
        reader.expect_crlf(_ask(len(views[i + 1])) if i + 1 < len(views) else 0)
    if reader.pending:
        raise redis.ResponseError("the server sent more than the replies asked for")
    if error is not None:
        raise redis.ResponseError(error)
    return lengths


def read_simple(sock: socket.socket, n: int) -> list[bytes | redis.ResponseError]:
    """Read ``n`` simple replies (``+OK``) from ``sock``: each its text, or the error the server sent.

    Only for a socket that carries the replies to the ``n`` commands just sent.

    Raises
    ------
    redis.ConnectionError
        If the server closed the connection.
    """
    reader = _Reader(sock)
    replies: list[bytes | redis.ResponseError] = []
    for _ in range(n):
        line = reader.line(256)
        kind, rest = line[:1], line[1:]
        if kind not in (b"+", b"-"):
            raise redis.ResponseError(f"unexpected reply {line[:40]!r} where a status was due")
        replies.append(rest if kind == b"+" else redis.ResponseError(rest.decode(errors="replace")))
    return replies


def _ask(n: int) -> int:
    """Bytes to ask for when the header of an ``n``-byte reply is needed.

    Just the header before a large payload (which then lands in place), a
    read-ahead of many replies before a small one.
    """
    return _READ_AHEAD if n < _SMALL else len(b"$%d\r\n" % n)


class _Reader:
    """Bytes already received but not parsed, over one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self.buf)

    def _more(self, want: int) -> None:
        """Receive at least one byte, at most ``want``."""
        chunk = self.sock.recv(max(want, 1))
        if not chunk:
            raise redis.ConnectionError("the tier's server closed the connection")
        self.buf += chunk

    def line(self, hint: int) -> bytes:
        """Return the next line without its CRLF, receiving up to ``hint`` bytes at a time."""
        while (end := self.buf.find(b"\r\n")) < 0:
            self._more(max(hint - len(self.buf), 1))
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: what is buffered first, the rest straight from the socket."""
        done = min(len(self.buf), len(view))
        view[:done] = self.buf[:done]
        del self.buf[:done]
        while done < len(view):
            n = self.sock.recv_into(view[done:])
            if not n:
                raise redis.ConnectionError("the tier's server closed the connection")
            done += n

    def skip(self, n: int) -> None:
        """Consume ``n`` payload bytes nobody wants."""
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            k = min(n, len(scratch))
            self.into(scratch[:k])
            n -= k

    def expect_crlf(self, then: int) -> None:
        """Consume the CRLF after a payload; ``then`` more bytes (what follows) may come with it."""
        while len(self.buf) < 2:
            self._more(2 - len(self.buf) + then)
        if self.buf[:2] != b"\r\n":
            raise redis.ResponseError("malformed bulk reply from the tier's server")
        del self.buf[:2]
