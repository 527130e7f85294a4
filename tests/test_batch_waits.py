"""Batch waits (``batch_wait_us``): io_uring with the kernel's min_wait (Linux 6.12) or its
emulation (6.7), and epoll's sleep that no arriving data ends. A worker waits for a batch only
while requests come fast enough to fill its window; a lone request is held at most one window,
and rarely.
"""

from __future__ import annotations

import itertools
import platform
import socket
import time

import pytest

from iocpnative import Client, Server, available_backends


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (IndexError, ValueError):
        return False


# io_uring batch waits: with the kernel's batch timeout (IORING_FEAT_MIN_TIMEOUT, Linux 6.12),
# else emulated on a DEFER_TASKRUN ring from Linux 6.7; older kernels never wait for a batch.
URING_BATCHES = _kernel_at_least(6, 7)
WINDOW_US = 300_000

CASES = []
if "io_uring" in available_backends():
    CASES += [
        # batched: tried, never longer than the window, then dropped
        pytest.param("io_uring", WINDOW_US, "", URING_BATCHES, id="io_uring"),
        pytest.param("io_uring", 0, "", False, id="io_uring-off"),  # answered at once
        # without the kernel's batch timeout: emulated
        pytest.param("io_uring", WINDOW_US, "min_wait", URING_BATCHES, id="io_uring-emulated"),
        # neither: no batching
        pytest.param("io_uring", WINDOW_US, "min_wait,defer_taskrun", False, id="io_uring-none"),
    ]
if "epoll" in available_backends():
    CASES += [
        pytest.param("epoll", WINDOW_US, "", True, id="epoll"),
        pytest.param("epoll", 0, "", False, id="epoll-off"),
    ]


def _reply_delays(srv: Server, idle: int, rounds: int, pause: float = 0.0) -> list[float]:
    """With `idle` quiet connections (their recvs posted), time `rounds` lone requests, each sent
    `pause` seconds after the reply to the one before."""
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(idle)]
    try:
        deadline = time.monotonic() + 10
        while srv.stats().active_connections < idle + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.stats().active_connections == idle + 1
        time.sleep(0.05)  # every worker loop has posted its recvs and gone to sleep
        delays = []
        for i in range(rounds):
            if pause:
                time.sleep(pause)
            conns[0].sendall(b"q%d" % i)
            t0 = time.monotonic()
            assert conns[0].recv(16) == b"q%d" % i
            delays.append(time.monotonic() - t0)
        return delays
    finally:
        for c in conns:
            c.close()


@pytest.mark.parametrize(("backend", "batch_wait_us", "off", "waits"), CASES)
def test_batch_wait_holds_a_lone_request_at_most_the_window_and_rarely(
    backend: str, batch_wait_us: int, off: str, waits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lone requests, each sent right after the previous reply, with 31 quiet connections (32
    recvs posted, so a batch of 8 would be asked for). A batch wait can gather nothing here: the
    next request waits for this reply. The worker tries one (it waits out the window, no longer),
    sees it gather less than 1.25 requests, and answers at once for the next 2, 4, ... spans.
    io_uring's polling is off: a worker that polls (SpinPolicy, when the burst of 31 connections
    made most of a span's waits short) answers each next request within its poll, before any
    batch wait; polling has tests of its own (test_uring.py)."""
    monkeypatch.setenv("IOCPNATIVE_URING_DISABLE", ",".join(x for x in (off, "poll") if x))
    with Server(port=0, workers=1, backend=backend, batch_wait_us=batch_wait_us) as srv:
        # A handshake-completing client so active_connections counts the probe connection too.
        with Client(port=srv.port, timeout=10) as cli:
            assert cli.request(b"hello") == b"hello"
            delays = _reply_delays(srv, 31, 8)
        window = WINDOW_US / 1e6
        held = [d for d in delays if d >= 0.8 * window]
        if waits:
            assert all(d < 1.7 * window for d in delays), delays
            # Whether the worker tries a batch wait here depends on how long the set-up's span
            # took (all 8 requests fall in the span after it); the paced test below shows that
            # it does.
            assert len(held) <= 3, delays
        else:
            assert min(delays) < 0.1 and max(delays) < 0.5 * window, delays
    stats = srv.stats()
    assert (stats.pool_in_use, stats.pool_allocated) == (0, 0)


@pytest.mark.parametrize(("backend", "batch_wait_us", "off", "waits"), CASES)
def test_batch_wait_is_tried_for_paced_requests_and_backs_off(
    backend: str, batch_wait_us: int, off: str, waits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lone requests 20 ms apart (each sent 20 ms after the reply to the one before), with 31
    quiet connections. Every span (5 ms or more) then ends after one request in about 20 ms:
    15 per 300 ms window by the rate, so BatchPolicy turns batch waits on (epoll: fewer than one
    a millisecond, so a window would not bring two batches either). The batch wait after a reply
    holds the next request for the window and gathers only that one, so the policy backs off for
    2 spans, then 4, 8, ...: of 16 requests a few are held, never two in a row, further and further
    apart (set-up's own batch waits may have started the doubling). Without batch waits none is
    held."""
    monkeypatch.setenv("IOCPNATIVE_URING_DISABLE", ",".join(x for x in (off, "poll") if x))
    with Server(port=0, workers=1, backend=backend, batch_wait_us=batch_wait_us) as srv:
        with Client(port=srv.port, timeout=10) as cli:
            assert cli.request(b"hello") == b"hello"
            delays = _reply_delays(srv, 31, 16, pause=0.02)
        window = WINDOW_US / 1e6
        held = [i for i, d in enumerate(delays) if d >= 0.8 * window]
        if waits:
            assert all(d < 1.7 * window for d in delays), delays
            assert 1 <= len(held) <= 4, delays
            gaps = [b - a for a, b in itertools.pairwise(held)]
            assert all(g >= 3 for g in gaps) and gaps == sorted(set(gaps)), delays
        else:
            assert held == [] and max(delays) < 0.5 * window, delays
    stats = srv.stats()
    assert (stats.pool_in_use, stats.pool_allocated) == (0, 0)
