"""The echo server: Python configures, starts and stops it; native workers do all the I/O."""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import FrameType, TracebackType
from typing import Any

from . import _native
from ._validate import (
    MAX_BUFFER_SIZE,
    MAX_CONNECTIONS,
    MAX_WORKERS,
    check_backend,
    check_batch_wait_us,
    check_bool,
    check_host,
    check_port,
    check_positive_int,
    check_timeout,
)

DEFAULT_BUFFER_SIZE = 65536
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_BATCH_WAIT_US: int = _native.DEFAULT_BATCH_WAIT_US  # config.hpp's kDefaultBatchWaitUs

logger = logging.getLogger("iocpnative")

#: What a handler may return: the bytes to send back (any bytes-like object), or None for nothing.
Reply = bytes | bytearray | memoryview | None
#: ``fn(data) -> Reply``, or ``fn(conn_id, data) -> Reply`` when it declares two parameters.
Handler = Callable[[bytes], Reply] | Callable[[int, bytes], Reply]
#: ``on_connect(conn_id, peer)``, peer as ``"host:port"``.
ConnectCallback = Callable[[int, str], object]
#: ``on_disconnect(conn_id)``.
DisconnectCallback = Callable[[int], object]

# Seconds between the warnings the interpreter-exit hook logs while a handler keeps a server from
# stopping.
_EXIT_STOP_TIMEOUT = 5.0
_servers_with_callbacks: weakref.WeakSet[Server] = weakref.WeakSet()


@dataclass(frozen=True)
class ServerStats:
    """Counters summed over all workers.

    On a running server each worker's counters are read one after another, not as one snapshot
    (``bytes_sent`` may briefly be ahead of ``bytes_received``); after ``stop()`` they are final.

    After a clean ``stop()``, ``pool_in_use`` and ``pool_allocated`` are 0: every IoData and
    its buffer went back to the pool and the pool's memory was freed. ``recv_buffers`` counts
    the receive buffers handed to the kernel: io_uring's provided buffer rings (32 per worker at
    the default buffer size, more once many busy connections find them all taken); IOCP's reads
    posted with a buffer (a new connection, and one that has waited about a second, waits with a
    zero-byte read instead); 0 on epoll and after ``stop()``.
    """

    active_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    pool_in_use: int = 0
    pool_allocated: int = 0
    handler_errors: int = 0
    recv_buffers: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _report_callback_error(where: str, conn_id: int, exc: BaseException) -> None:
    """Called by the native workers (GIL held) when a Python callback raised."""
    what = "closing the connection" if where != "on_disconnect" else "connection already closed"
    logger.error("iocpnative %s raised on connection %d (%s)", where, conn_id, what, exc_info=exc)


def _takes_conn_id(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` declares two positional parameters: it is called as fn(conn_id, data).

    Parameters with defaults count only when no parameter is required; a callable whose
    signature cannot be read (some builtins) is called with the data alone.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    if not positional and not varargs:
        raise ValueError(
            f"handler must take (data) or (conn_id, data), but {fn!r} takes no positional argument"
        )
    if len(required) > 2:
        raise ValueError(
            f"handler must take (data) or (conn_id, data), but {fn!r} requires "
            f"{len(required)} positional arguments"
        )
    return len(required) == 2 or (not required and len(positional) >= 2)


def _make_native_handler(
    handler: Handler | None,
    on_connect: ConnectCallback | None,
    on_disconnect: DisconnectCallback | None,
) -> _native.Handler | None:
    if handler is None:
        if on_connect is not None or on_disconnect is not None:
            raise ValueError("on_connect and on_disconnect need a handler")
        return None
    for name, fn in (
        ("handler", handler),
        ("on_connect", on_connect),
        ("on_disconnect", on_disconnect),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {fn!r}")
    return _native.Handler(
        handler, _takes_conn_id(handler), on_connect, on_disconnect, _report_callback_error
    )


@atexit.register
def _stop_servers_at_exit() -> None:
    # Worker threads must not call into an interpreter that is finalizing: a thread that wakes
    # up in a finalizing interpreter is ended inside Python, under our native frames. So stop
    # servers with Python callbacks while the interpreter is still whole, and, like Python's own
    # non-daemon threads, wait for a blocked handler to return.
    for srv in list(_servers_with_callbacks):
        while True:
            try:
                srv.stop(_EXIT_STOP_TIMEOUT)
                break
            except TimeoutError:
                logger.warning("%r: waiting at exit for a handler to return", srv)


class Server:
    """A TCP server on native worker threads: an echo server, or your Python handler's.

    ``port=0`` picks a free port (read it back from ``.port`` after ``start()``). ``workers``
    (1..1024) defaults to the CPU count (at most 1024). ``backend="auto"`` takes the best
    backend usable here (see ``available_backends()``; the ``IOCPNATIVE_BACKEND`` environment
    variable overrides it).
    ``buffer_size`` is the most one receive reads; ``max_connections`` caps concurrent
    connections (more are accepted and closed at once, counted in ``rejected_connections``);
    ``idle_timeout`` closes a connection that has received nothing for that many seconds.
    ``batch_wait_us`` (Linux: io_uring from 6.7, and epoll; default 500): with many receives
    posted, a worker may wait this long for a batch of completions before answering what it has,
    so a moderate message rate costs one wake-up per batch instead of one per message, for up to
    this much more latency (measured side by side at 20,000-30,000 msgs/s on an AMD VM: 500
    cost 0.73-0.75x the server CPU per message of a C epoll server, 200 0.88-0.90x, with a p50
    of about 450 against 300 and c_epoll's 170 microseconds; see the README); ``0`` answers
    every completion at once. A lone connection, or a few, never waits; nor do requests that
    arrive too slowly, or too much one at a time, for a window to gather at least 1.25 of them
    (there the kernel timer of a batch wait costs more than it saves), nor a saturated worker
    (io_uring polls instead). ``verbose=True`` writes a line to stderr for each connect and
    disconnect.

    ``handler``: without it the server echoes every byte natively. With it, ``handler(data)``
    (or ``handler(conn_id, data)`` if it declares two positional parameters) is called on a
    worker thread with each chunk received on a connection, as ``bytes``, and what it returns
    (``bytes``, ``bytearray``, ``memoryview`` or any bytes-like object) is sent back on that
    connection, in order; ``None`` sends nothing. TCP has no message boundaries: a chunk is
    whatever one receive returned (at most ``buffer_size`` bytes), not a message the peer sent;
    one send may arrive split over several calls and several sends may arrive in one. Keep
    per-connection buffers (keyed by ``conn_id``) to reassemble messages. A connection's calls
    never overlap; calls for different connections may run on different workers. The worker
    holds the GIL only around the calls, and calls the handler for all chunks of one completion
    batch under one GIL acquisition. While a reply is being sent, the connection reads nothing
    more (back-pressure).

    If the handler raises, or returns anything else, the exception is logged with its traceback
    on the ``"iocpnative"`` logger, the connection is closed, ``stats().handler_errors`` grows,
    and the other connections are served on. ``on_connect(conn_id, peer)`` and
    ``on_disconnect(conn_id)`` are optional; an exception in them is logged and counted the same
    way (and closes the connection, for on_connect). on_disconnect is called once for every
    connection on_connect saw. A handler that blocks cannot hold up ``stop()`` past its timeout;
    a callback must not call ``stop()`` itself (it would wait for its own worker).

    Raises ``ValueError`` for bad arguments (here, before any socket exists; ``TypeError`` for a
    callback that is not callable), ``OSError`` from ``start()`` for system failures
    (``errno.EADDRINUSE`` when the port is taken).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6000,
        *,
        workers: int | None = None,
        backend: str = "auto",
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float | None = None,
        batch_wait_us: int = DEFAULT_BATCH_WAIT_US,
        handler: Handler | None = None,
        on_connect: ConnectCallback | None = None,
        on_disconnect: DisconnectCallback | None = None,
        verbose: bool = False,
    ) -> None:
        self._host = check_host(host)
        self._port = check_port(port)
        w = 0 if workers is None else check_positive_int("workers", workers, MAX_WORKERS)
        check_backend(backend)
        buffer_size = check_positive_int("buffer_size", buffer_size, MAX_BUFFER_SIZE)
        max_connections = check_positive_int("max_connections", max_connections, MAX_CONNECTIONS)
        idle = check_timeout("idle_timeout", idle_timeout, allow_none=True)
        batch_wait_us = check_batch_wait_us(batch_wait_us)
        native_handler = _make_native_handler(handler, on_connect, on_disconnect)
        # Raises ValueError naming the usable backends when this one is not usable here.
        self._backend = _native.resolve_backend(backend)
        self._workers = w or min(os.cpu_count() or 1, MAX_WORKERS)
        self._native = _native.Server(
            self._host,
            self._port,
            self._workers,
            backend,
            buffer_size,
            max_connections,
            idle or 0.0,
            check_bool("verbose", verbose),
            native_handler,
            batch_wait_us,
        )
        self._has_callbacks = native_handler is not None
        self._stop_event = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Server:
        """Bind, listen and start the workers; returns self. RuntimeError if started twice."""
        # Cleared first: a signal that serve_forever() catches while the workers start is kept.
        self._stop_event.clear()
        self._native.start()
        self._backend = self._native.backend
        self._workers = self._native.workers
        if self._has_callbacks:
            _servers_with_callbacks.add(self)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, drain all I/O, join the workers, free the pool.

        Idempotent. Blocks until done, at most ``timeout`` seconds; ``TimeoutError`` after that
        (a handler still running, or a timeout too short for the workers to finish closing their
        connections): call ``stop()`` again. ``running`` is False from the first call on.
        """
        t = check_timeout("timeout", timeout, allow_none=False)
        try:
            self._native.stop(t)
            _servers_with_callbacks.discard(self)
        finally:
            self._stop_event.set()

    def serve_forever(
        self,
        poll_interval: float = 0.5,
        *,
        ready: Callable[[], object] | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        """Block until ``stop()`` is called from another thread, or SIGINT/SIGTERM arrives.

        Then stop gracefully. Signal handlers are installed only when called from the main
        thread, before the server starts, and the previous ones are restored afterwards.
        ``ready()`` is called once the server is running with the handlers in place, so what it
        announces (e.g. "listening on ...") is true: a signal from then on stops gracefully.
        The final ``stop()`` gets ``stop_timeout`` seconds (``TimeoutError`` as in ``stop()``).
        """
        poll = check_timeout("poll_interval", poll_interval, allow_none=False)
        if poll is not None and poll > threading.TIMEOUT_MAX:  # Event.wait() would overflow
            raise ValueError(
                f"poll_interval must be a number of seconds <= {threading.TIMEOUT_MAX:g}, "
                f"got {poll_interval!r}"
            )
        stop_t = check_timeout("stop_timeout", stop_timeout, allow_none=False)
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop_event.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            if not self.running:
                self.start()
            if ready is not None:
                ready()
            while not self._stop_event.wait(poll):
                if not self.running:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop(stop_t)

    # --- properties --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (useful with ``port=0``), else the configured one."""
        p = self._native.port
        return int(p) if p else self._port

    @property
    def backend(self) -> str:
        """The resolved backend name (never ``"auto"``)."""
        return self._backend

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def running(self) -> bool:
        return bool(self._native.running)

    def stats(self) -> ServerStats:
        """Current counters; readable before, during and after ``stop()``."""
        return ServerStats(**self._native.stats())

    # --- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Server:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<iocpnative.Server {self._host}:{self.port} backend={self._backend} "
            f"workers={self._workers} {state}>"
        )
