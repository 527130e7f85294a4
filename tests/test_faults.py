"""Fault and load tests, on every backend available here.

Storms of connects and resets, half-close, peers that never read, 10,000 idle connections,
stop() from another thread under load, stop(timeout) with stuck peers, and random payloads and
segmentation (hypothesis). After each: the server's counters back to zero (nothing in use,
the pool freed, no connection left) and this process's descriptors and threads back to where
they were before the test. `backend` is the shared fixture of tests/conftest.py (one run per
backend in iocpnative.available_backends()).
"""

from __future__ import annotations

import itertools
import os
import random
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iocpnative import Client, Server

HOST = "127.0.0.1"
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
SMALL_BUF = 64 * 1024  # client socket buffers for peers that never read: bounds kernel memory


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def back_to_baseline() -> Iterator[None]:
    """Descriptors and threads (native ones included) must be back where they were."""
    fds, threads = open_fds(), native_threads()
    yield
    wait_for(lambda: open_fds() <= fds and native_threads() <= threads, "fds and threads")
    assert (open_fds(), native_threads()) == (fds, threads)


def assert_freed(srv: Server) -> None:
    st_ = srv.stats()
    assert st_.pool_in_use == 0, st_
    assert st_.pool_allocated == 0, st_
    assert st_.active_connections == 0, st_


@contextmanager
def serving(backend: str, **kwargs: Any) -> Iterator[Server]:
    """A started server; on the way out it is stopped and must have freed everything."""
    kwargs.setdefault("workers", 2)
    srv = Server(HOST, 0, backend=backend, **kwargs).start()
    try:
        yield srv
    finally:
        srv.stop(10.0)
    assert_freed(srv)


def connect(port: int, *, small_buffers: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if small_buffers:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
    s.connect((HOST, port))
    return s


def fill_until_blocked(s: socket.socket, quiet: float = 0.2) -> int:
    """Sends until the connection stands still: not writable for `quiet` seconds, i.e. every
    buffer on the way is full and the server no longer reads from us. Returns bytes sent."""
    s.setblocking(False)
    chunk = b"\xa5" * 65536
    sent = 0
    while True:
        try:
            sent += s.send(chunk)
            continue
        except BlockingIOError:
            pass
        _, writable, _ = select.select([], [s], [], quiet)
        if not writable:
            return sent


def read_to_eof(s: socket.socket, timeout: float = 20.0) -> bytes:
    s.settimeout(timeout)
    parts = []
    while chunk := s.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def exchange(s: socket.socket, segments: list[bytes]) -> bytes:
    """Sends the segments then shuts down writing, from a thread, while this thread reads the
    echo to EOF (reading only after sending could deadlock once the buffers are full)."""

    def send() -> None:
        for seg in segments:
            s.sendall(seg)
        s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return read_to_eof(s)
    finally:
        sender.join(30.0)


def echo_alive(port: int) -> None:
    payload = os.urandom(50_000)
    with Client(HOST, port, timeout=10.0) as cli:
        assert cli.request(payload) == payload


# --- storms -------------------------------------------------------------------------------------


def test_thousands_of_connects_and_resets(backend: str, back_to_baseline: None) -> None:
    rounds = 3000
    payload = os.urandom(3000)
    with serving(backend, buffer_size=1024) as srv:
        for i in range(rounds):
            s = connect(srv.port)
            kind = i % 4
            if kind in (1, 2):
                s.sendall(payload)  # data in flight when the reset arrives
            if kind == 2:
                s.recv(100)  # ... and part of the echo read: a reset mid-echo
            if kind != 3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            s.close()  # kind 3: an orderly FIN
        echo_alive(srv.port)
        wait_for(lambda: srv.stats().total_connections == rounds + 1, "every connection accepted")
        wait_for(lambda: srv.stats().active_connections == 0, "every connection closed")
        st_ = srv.stats()
        assert st_.rejected_connections == 0
        assert st_.pool_in_use == 0


def test_half_close_gets_pending_echo_then_eof(backend: str, back_to_baseline: None) -> None:
    with serving(backend, buffer_size=4096) as srv:
        for size in (1, 4095, 4096, 70_000, 3 << 20):
            payload = os.urandom(size)
            # Send from a thread while this one reads: the echo of a large payload does not fit
            # in the socket buffers, so reading only after sending could deadlock.
            with connect(srv.port) as s:
                echoed = exchange(s, [payload])
            assert len(echoed) == size
            assert echoed == payload
        wait_for(lambda: srv.stats().active_connections == 0, "half-closed connections closed")


def test_peers_that_never_read(backend: str, back_to_baseline: None) -> None:
    buffer_size = 4096
    hogs = 8
    with serving(backend, buffer_size=buffer_size) as srv:
        peers = [connect(srv.port, small_buffers=True) for _ in range(hogs)]
        for p in peers:
            assert fill_until_blocked(p) > 0
        wait_for(lambda: srv.stats().active_connections == hogs, "hogs connected")
        st_ = srv.stats()
        # Backpressure: the server holds at most one buffer per connection, i.e. it stops
        # reading from a peer whose echo cannot be written, instead of buffering without bound.
        assert st_.bytes_received - st_.bytes_sent <= hogs * buffer_size, st_
        # Each hog's connection has one send in flight, waiting for it to read; on io_uring a
        # multishot recv may also have read ahead up to one buffer (when the recv before the
        # blocked send took less than a buffer), which waits for the send, unechoed.
        most = 2 * hogs if backend == "io_uring" else hogs
        assert hogs <= st_.pool_in_use <= most, st_
        # The other clients are still served while the hogs are stuck.
        for _ in range(5):
            echo_alive(srv.port)
        t0 = time.monotonic()
        srv.stop(5.0)
        assert time.monotonic() - t0 < 5.0
        assert_freed(srv)
        for p in peers:
            p.close()


# --- 10,000 idle connections --------------------------------------------------------------------

IDLE_CONNECTIONS = 10_000

# Holds the client ends in a child process, so that neither process needs 20,000 descriptors.
HOLDER = r"""
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", port))
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()  # the parent has stopped the server
ended = 0
for s in socks:
    s.settimeout(10)
    try:
        ended += s.recv(1) == b""
    except ConnectionResetError:
        ended += 1
    s.close()
print(ended, flush=True)
"""


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Raises RLIMIT_NOFILE (this process's and, inherited, the holder's) for 10,000 sockets."""
    need = IDLE_CONNECTIONS + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))
    except (ValueError, OSError) as e:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {need} (hard limit {hard}, not root): {e}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, max(hard, need)))


def test_ten_thousand_idle_connections(
    backend: str, many_fds: None, back_to_baseline: None
) -> None:
    n = IDLE_CONNECTIONS
    srv = Server(HOST, 0, backend=backend, workers=2, max_connections=n + 1).start()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(n), str(srv.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "connected"
        wait_for(lambda: srv.stats().active_connections == n, f"{n} connections", timeout=60)
        echo_alive(srv.port)  # the server still serves with 10,000 connections held
        wait_for(lambda: srv.stats().active_connections == n, "the extra client gone")
        st_ = srv.stats()
        assert st_.rejected_connections == 0
        assert st_.total_connections == n + 1
        t0 = time.monotonic()
        srv.stop(30.0)
        stop_s = time.monotonic() - t0
        assert_freed(srv)
        # Every held connection was closed by stop(): the holder sees EOF on each.
        out, _ = holder.communicate("go\n", timeout=120)
        assert int(out.strip()) == n
        assert stop_s < 10.0
        print(f"{backend}: {n} idle connections held, stop() took {stop_s * 1000:.0f} ms")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
        srv.stop(10.0)


# --- stop() ---------------------------------------------------------------------------------------


def test_stop_from_another_thread_under_full_load(backend: str, back_to_baseline: None) -> None:
    srv = Server(HOST, 0, backend=backend, workers=2, buffer_size=8192).start()
    n_threads = 16
    rounds = [0] * n_threads
    mismatches = [0]
    endings: list[BaseException | None] = [None] * n_threads
    connected = threading.Barrier(n_threads + 1)

    def load(i: int) -> None:
        rng = random.Random(i)
        try:
            with Client(HOST, srv.port, timeout=15.0) as cli:
                connected.wait()
                while True:
                    payload = rng.randbytes(rng.randint(1, 100_000))
                    if cli.request(payload) != payload:
                        mismatches[0] += 1
                    rounds[i] += 1
        except Exception as e:
            endings[i] = e

    threads = [threading.Thread(target=load, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    connected.wait()
    wait_for(lambda: min(rounds) >= 5, "every client busy")
    timing: list[float] = []

    def stopper() -> None:
        t0 = time.monotonic()
        srv.stop(5.0)
        timing.append(time.monotonic() - t0)

    st_thread = threading.Thread(target=stopper)
    st_thread.start()
    st_thread.join(10.0)
    assert not st_thread.is_alive(), "stop() hung under load"
    assert timing and timing[0] < 5.0
    for t in threads:
        t.join(30.0)
    assert not any(t.is_alive() for t in threads)
    assert mismatches[0] == 0
    for e in endings:
        # The server closed every connection: the clients see a reset or EOF, never a timeout.
        assert isinstance(e, ConnectionError), repr(e)
    assert_freed(srv)
    with pytest.raises(ConnectionRefusedError):
        Client(HOST, srv.port, timeout=5.0)


def test_stop_timeout_is_kept_with_stuck_peers(backend: str, back_to_baseline: None) -> None:
    srv = Server(HOST, 0, backend=backend, workers=2, buffer_size=4096).start()
    stuck = [connect(srv.port, small_buffers=True) for _ in range(6)]
    for p in stuck[:3]:
        fill_until_blocked(p)  # server blocked sending to a peer that never reads
    stuck[3].sendall(b"half a message, then silence")
    stuck[4].shutdown(socket.SHUT_WR)  # half-closed, never reads its (empty) echo
    # stuck[5]: connected, sends nothing
    wait_for(lambda: srv.stats().active_connections >= 5, "stuck peers connected")

    # A timeout too short to drain everything either succeeds or raises TimeoutError, and
    # either way returns within its timeout (plus scheduling slack).
    t0 = time.monotonic()
    with suppress(TimeoutError):
        srv.stop(0.001)
    assert time.monotonic() - t0 < 0.5
    # A reasonable timeout: the stuck peers cannot delay it, since closing cancels their I/O.
    t0 = time.monotonic()
    srv.stop(1.0)
    assert time.monotonic() - t0 < 1.0
    assert_freed(srv)
    for p in stuck:
        p.close()


# --- random payloads and segmentation -----------------------------------------------------------


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[int, int, int, list[int], bool]:
    buffer_size = draw(st.sampled_from([1, 7, 1024, 4096, 65536]))
    # A 1-byte buffer means one completion per byte: keep those payloads small.
    limit = 3000 if buffer_size < 1024 else 400_000
    size = draw(st.integers(1, limit))
    cuts = draw(st.lists(st.integers(1, size), max_size=12))
    seed = draw(st.integers(0, 2**32 - 1))
    return buffer_size, size, seed, sorted(set(cuts)), draw(st.booleans())


def test_random_payloads_and_segmentation(backend: str, back_to_baseline: None) -> None:
    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(exchanges())
    def check(ex: tuple[int, int, int, list[int], bool]) -> None:
        buffer_size, size, seed, cuts, nodelay = ex
        payload = random.Random(seed).randbytes(size)
        bounds = [0, *cuts, size]
        segments = [payload[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        with serving(backend, buffer_size=buffer_size) as srv:
            with connect(srv.port) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
                echoed = exchange(s, segments)
            assert echoed == payload
            wait_for(lambda: srv.stats().active_connections == 0, "connection closed")
            st_ = srv.stats()
            assert st_.bytes_received == st_.bytes_sent == size

    check()
