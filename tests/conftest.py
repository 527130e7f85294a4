"""Shared fixtures: every test runs once per backend usable on this machine.

Servers always bind port 0 and are always stopped, even when a test fails. ``wait_until`` polls
a condition against a deadline so that no test sleeps a fixed time where it can poll instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

import iocpnative

BACKENDS = iocpnative.available_backends()
T = TypeVar("T")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of one backend usable here; tests using it run once per backend."""
    return str(request.param)


ServerFactory = Callable[..., iocpnative.Server]


@pytest.fixture
def make_server(backend: str) -> Iterator[ServerFactory]:
    """Build (and by default start) Servers on port 0 with this test's backend.

    Every server made here is stopped at teardown, whatever the test did; a teardown stop that
    fails fails the test.
    """
    made: list[iocpnative.Server] = []

    def factory(*, start: bool = True, **kwargs: object) -> iocpnative.Server:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("backend", backend)
        kwargs.setdefault("workers", 2)
        srv = iocpnative.Server(**kwargs)  # type: ignore[arg-type]
        made.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    for srv in made:
        srv.stop(timeout=10.0)


@pytest.fixture
def server(make_server: ServerFactory) -> iocpnative.Server:
    """A started echo server with default settings (2 workers) on this test's backend."""
    return make_server()


def wait_until(
    condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """Poll ``condition`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition!r}")
        time.sleep(interval)


def open_fds() -> int:
    """File descriptors open in this process."""
    return len(os.listdir("/proc/self/fd"))


def native_threads() -> int:
    """OS threads of this process (Python threads and native workers alike)."""
    return len(os.listdir("/proc/self/task"))


@dataclass(frozen=True)
class Resources:
    fds: int
    os_threads: int
    py_threads: int

    @staticmethod
    def now() -> Resources:
        return Resources(open_fds(), native_threads(), threading.active_count())


def assert_back_to_baseline(baseline: Resources, timeout: float = 5.0) -> None:
    """Fds and threads return to ``baseline`` (polled: exiting threads take a moment)."""
    wait_until(
        lambda: Resources.now() == baseline,
        timeout=timeout,
        what=f"resources back to {baseline}",
    )


@pytest.fixture
def baseline() -> Resources:
    """Fds and threads before the test made anything.

    A thread joined by an earlier test may still be leaving the kernel's task list for a moment
    after Python considers it finished: let those go first, or they would count in the baseline.
    """
    deadline = time.monotonic() + 2.0
    while native_threads() > threading.active_count() and time.monotonic() < deadline:
        time.sleep(0.005)
    return Resources.now()


def assert_drained(srv: iocpnative.Server) -> None:
    """After stop(): nothing in flight, no pool memory, no connection left."""
    st = srv.stats()
    assert not srv.running
    assert st.pool_in_use == 0, st
    assert st.pool_allocated == 0, st
    assert st.active_connections == 0, st


def raw_connect(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A plain Python socket connected to ``host:port`` (caller closes it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes from ``s`` or fail on early EOF."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            pytest.fail(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def reset_close(s: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer gets RST instead of FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def is_closed_by_peer(s: socket.socket) -> bool:
    """True when the peer has closed ``s`` (EOF or reset), False while it is still open.

    Reads and discards whatever data is pending, so an echo still queued does not hide the EOF.
    """
    previous = s.gettimeout()
    s.setblocking(False)
    try:
        while s.recv(1 << 20):
            pass
        return True
    except BlockingIOError:
        return False
    except (ConnectionResetError, ConnectionAbortedError):
        return True
    finally:
        s.settimeout(previous)


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()
