"""The blocking client (native socket calls, GIL released) and the seed's client loop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType

from . import _native
from ._validate import check_host, check_port, check_positive_int, check_timeout

BytesLike = bytes | bytearray | memoryview


class Client:
    """A connected TCP client. Every call blocks at most ``timeout`` seconds (``None``: no limit).

    Raises ``ConnectionRefusedError`` when nothing listens, ``TimeoutError`` at the deadline,
    ``ConnectionError`` when the server closes in the middle of ``request()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 6000, *, timeout: float = 5.0) -> None:
        self._host = check_host(host)
        self._port = check_port(port)
        t = check_timeout("timeout", timeout, allow_none=True)
        self._native: _native.Client | None = _native.Client(self._host, self._port, t or 0.0)

    def _conn(self) -> _native.Client:
        if self._native is None:
            raise OSError(9, "client is closed")  # EBADF, like a closed socket
        return self._native

    def send(self, data: BytesLike) -> int:
        """Send all of ``data``; returns its length."""
        return int(self._conn().send(data))

    def recv(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` once the server has closed the connection."""
        check_positive_int("max_bytes", max_bytes)
        return bytes(self._conn().recv(max_bytes))

    def request(self, data: BytesLike) -> bytes:
        """Send ``data`` and read back exactly ``len(data)`` bytes (the echo).

        Reads while it sends, so payloads larger than the socket buffers cannot deadlock.
        """
        return self._conn().request(data)

    def shutdown_write(self) -> None:
        """Half-close: the server sees EOF; replies can still be read."""
        self._conn().shutdown_write()

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
            self._native = None

    @property
    def closed(self) -> bool:
        return self._native is None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()


# The longest interval between messages: time.sleep() raises OverflowError for about 9.2e9 s and
# more (its deadline is int64 nanoseconds), the native client's sleep would overflow the same way.
MAX_INTERVAL = 1e6


def check_client_loop_args(interval: object, count: object) -> None:
    """ValueError for an interval that is not a number of seconds in 0..MAX_INTERVAL (time.sleep
    cannot take inf or 1e10, and nan would fail only after the first reply) or a count that is
    not >= 1."""
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not math.isfinite(interval)
        or not 0 <= interval <= MAX_INTERVAL
    ):
        raise ValueError(
            f"interval must be a number of seconds in 0..{MAX_INTERVAL:.0f}, got {interval!r}"
        )
    if count is not None:
        check_positive_int("count", count)


def run_client_loop(
    host: str = "127.0.0.1",
    port: int = 6000,
    *,
    interval: float = 5.0,
    count: int | None = None,
    on_reply: Callable[[int, bytes], None] | None = None,
    timeout: float = 5.0,
) -> int:
    """The seed's client: send ``No:1``, ``No:2``, ... every ``interval`` seconds.

    Each reply is passed to ``on_reply(n, reply)`` (default: print ``Recv: No:n``). Runs
    ``count`` times, or forever when ``count`` is None. Returns the number of replies received.
    ``ValueError`` before connecting for an ``interval`` outside 0..1000000 seconds or a
    ``count`` < 1.
    """
    check_client_loop_args(interval, count)
    if count is not None:
        count = check_positive_int("count", count)
    received = 0
    with Client(host, port, timeout=timeout) as cli:
        n = 0
        while count is None or n < count:
            n += 1
            reply = cli.request(f"No:{n}".encode())
            received += 1
            if on_reply is None:
                print(f"Recv: {reply.decode(errors='replace')}", flush=True)
            else:
                on_reply(n, reply)
            if count is None or n < count:
                time.sleep(interval)
    return received
