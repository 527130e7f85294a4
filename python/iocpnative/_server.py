"""The echo server: Python configures, starts and stops it; native workers do all the I/O."""

from __future__ import annotations

import os
import signal
import threading
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
    check_host,
    check_port,
    check_positive_int,
    check_timeout,
)

DEFAULT_BUFFER_SIZE = 16384
DEFAULT_MAX_CONNECTIONS = 10000


@dataclass(frozen=True)
class ServerStats:
    """Counters summed over all workers at the moment they were read.

    After a clean ``stop()``, ``pool_in_use`` and ``pool_allocated`` are 0: every IoData and
    its buffer went back to the pool and the pool's memory was freed.
    """

    active_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    pool_in_use: int = 0
    pool_allocated: int = 0
    handler_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Server:
    """A TCP echo server on native worker threads.

    ``port=0`` picks a free port (read it back from ``.port`` after ``start()``). ``workers``
    defaults to the CPU count. ``backend="auto"`` takes the best backend usable here (see
    ``available_backends()``; the ``IOCPNATIVE_BACKEND`` environment variable overrides it).
    ``buffer_size`` is the most one receive reads; ``max_connections`` caps concurrent
    connections (more are accepted and closed at once, counted in ``rejected_connections``);
    ``idle_timeout`` closes a connection that has received nothing for that many seconds.

    Raises ``ValueError`` for bad arguments (here, before any socket exists), ``OSError`` from
    ``start()`` for system failures (``errno.EADDRINUSE`` when the port is taken).
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
        handler: Callable[..., Any] | None = None,
        verbose: bool = False,
    ) -> None:
        self._host = check_host(host)
        self._port = check_port(port)
        w = 0 if workers is None else check_positive_int("workers", workers, MAX_WORKERS)
        check_backend(backend)
        buffer_size = check_positive_int("buffer_size", buffer_size, MAX_BUFFER_SIZE)
        max_connections = check_positive_int("max_connections", max_connections, MAX_CONNECTIONS)
        idle = check_timeout("idle_timeout", idle_timeout, allow_none=True)
        if handler is not None:
            raise NotImplementedError("Python handlers are not supported yet")
        # Raises ValueError naming the usable backends when this one is not usable here.
        self._backend = _native.resolve_backend(backend)
        self._workers = w or (os.cpu_count() or 1)
        self._native = _native.Server(
            self._host,
            self._port,
            self._workers,
            backend,
            buffer_size,
            max_connections,
            idle or 0.0,
            bool(verbose),
        )
        self._stop_event = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Server:
        """Bind, listen and start the workers; returns self. RuntimeError if started twice."""
        # Cleared first: a signal that serve_forever() catches while the workers start is kept.
        self._stop_event.clear()
        self._native.start()
        self._backend = self._native.backend
        self._workers = self._native.workers
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, drain all I/O, join the workers, free the pool.

        Idempotent. Blocks until done, at most ``timeout`` seconds (``TimeoutError`` after that,
        which only a blocking handler can cause).
        """
        t = check_timeout("timeout", timeout, allow_none=False)
        try:
            self._native.stop(t)
        finally:
            self._stop_event.set()

    def serve_forever(
        self, poll_interval: float = 0.5, *, ready: Callable[[], object] | None = None
    ) -> None:
        """Block until ``stop()`` is called from another thread, or SIGINT/SIGTERM arrives.

        Then stop gracefully. Signal handlers are installed only when called from the main
        thread, before the server starts, and the previous ones are restored afterwards.
        ``ready()`` is called once the server is running with the handlers in place, so what it
        announces (e.g. "listening on ...") is true: a signal from then on stops gracefully.
        """
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
            while not self._stop_event.wait(poll_interval):
                if not self.running:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

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
