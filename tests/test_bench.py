"""The native load generator: bench() and `python -m iocpnative bench`, on every backend."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import iocpnative
from iocpnative import BenchResult, Server, bench

BACKENDS = iocpnative.available_backends()
SHORT = {"duration": 0.5, "warmup": 0.1, "connections": 10}
SLOW_REPLY_S = 0.05  # broken_echo("slow")
JSON_FIELDS = (
    "requests_per_s", "mb_per_s", "p50_us", "p99_us", "errors", "connections", "size", "duration_s",
)  # fmt: skip


@contextmanager
def broken_echo(mode: str) -> Iterator[int]:
    """A raw socket echo server that flips the first byte of every chunk ('flip') or its last
    ('flip_last'), echoes every chunk twice ('double'), answers a chunk with the connection's
    previous one when that had the same length ('stale'), reads and never answers ('drop'),
    answers a connection's first chunk only ('once': the load generator's priming echo passes,
    then nothing), or answers every 20th chunk of a connection 50 ms late ('slow'). Yields its
    port."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve(c: socket.socket) -> None:
        c.settimeout(0.1)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answered = 0
        previous = b""
        while not stop.is_set():
            try:
                data = c.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            reply = {
                "flip": bytes([data[0] ^ 0x01]) + data[1:],
                "flip_last": data[:-1] + bytes([data[-1] ^ 0x01]),
                "double": data + data,
                "stale": previous if len(previous) == len(data) else data,
                "once": data,
                "slow": data,
            }.get(mode)
            previous = data
            if reply is not None and (mode != "once" or answered == 0):
                answered += 1
                if mode == "slow" and answered % 20 == 0:
                    time.sleep(SLOW_REPLY_S)
                try:
                    c.sendall(reply)
                except OSError:
                    return

    def accept_loop() -> None:
        workers = []
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except TimeoutError:
                continue
            conns.append(c)
            t = threading.Thread(target=serve, args=(c,), daemon=True)
            t.start()
            workers.append(t)
        for t in workers:
            t.join()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        acceptor.join()
        for c in conns:
            c.close()
        lsock.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iocpnative", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_own_server(backend: str) -> None:
    r = bench(backend=backend, workers=1, **SHORT)
    assert isinstance(r, BenchResult)
    assert r.errors == 0, r.first_error
    assert r.requests_per_s > 0
    assert r.round_trips > 0
    assert r.backend == backend
    assert r.workers == 1
    assert r.connections == r.connections_open == 10
    assert 0 < r.p50_us <= r.p90_us <= r.p99_us <= r.p999_us <= r.max_us
    assert r.mb_per_s == pytest.approx(r.requests_per_s * 512 / 1e6)
    assert r.server_stats is not None
    assert r.server_stats["pool_in_use"] == 0
    assert r.server_stats["pool_allocated"] == 0
    # The server echoed at least what the window counted.
    assert r.server_stats["bytes_sent"] >= r.round_trips * 512


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_json(backend: str) -> None:
    p = run_cli(
        "--duration", "0.5", "--warmup", "0.1", "--connections", "10",
        "--backend", backend, "--workers", "1", "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    d = json.loads(last)
    for f in JSON_FIELDS:
        assert f in d, f
    assert d["errors"] == 0
    assert d["requests_per_s"] > 0
    assert d["connections"] == 10 and d["size"] == 512
    assert d["backend"] == backend
    assert "msgs/s" in p.stdout  # the table comes first
    assert "\r" not in p.stdout  # no progress line when stdout is not a terminal


@pytest.mark.parametrize("backend", BACKENDS)
def test_external_server_threads_pipeline(backend: str) -> None:
    with Server("127.0.0.1", 0, backend=backend, workers=2) as srv:
        r = bench(
            "127.0.0.1", srv.port, connections=8, size=3000, threads=2, pipeline=4,
            duration=0.5, warmup=0.1,
        )  # fmt: skip
        assert r.errors == 0, r.first_error
        assert r.requests_per_s > 0
        assert r.backend is None and r.server_stats is None
        assert srv.stats().total_connections == 8
    assert srv.stats().pool_in_use == 0


def test_progress_callback() -> None:
    seen: list[dict] = []
    r = bench(connections=4, duration=1.2, warmup=0.2, workers=1, progress=seen.append)
    assert r.errors == 0
    assert seen, "progress was never called"
    keys = {"phase", "elapsed_s", "round_trips", "recent_per_s", "errors", "open_connections"}
    assert keys <= set(seen[-1])
    assert seen[-1]["open_connections"] == 4
    assert any(p["recent_per_s"] > 0 for p in seen)


def test_progress_exception_stops_the_run() -> None:
    def boom(p: object) -> None:
        raise KeyError("stop here")

    with pytest.raises(KeyError):
        bench(connections=2, duration=30, warmup=0, workers=1, progress=boom)


def test_corrupting_server_is_caught() -> None:
    with broken_echo("flip") as port:
        r = bench("127.0.0.1", port, connections=4, duration=0.5, warmup=0.1)
        assert r.errors > 0
        assert r.error_kinds["corrupt"] > 0
        assert "corrupt" in r.first_error
        p = run_cli("--host", "127.0.0.1", "--port", str(port), "--connections", "2",
                    "--duration", "0.3", "--warmup", "0", "--json")  # fmt: skip
    assert p.returncode != 0
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert d["errors"] > 0 and d["ok"] is False


def test_corruption_at_the_end_of_a_chunk_is_caught() -> None:
    """Every byte is compared, the last of each arrival too (the test above flips the first)."""
    with broken_echo("flip_last") as port:
        r = bench("127.0.0.1", port, connections=4, duration=0.3, warmup=0)
    assert r.error_kinds["corrupt"] > 0, r
    assert "echoed with wrong bytes" in r.first_error


def test_bytes_that_were_never_sent_are_caught() -> None:
    """A server that echoes everything twice: with one message in flight, the copy arrives when
    nothing is awaited (in the same read as the echo, as the server sends both at once)."""
    with broken_echo("double") as port:
        r = bench("127.0.0.1", port, connections=2, duration=0.3, warmup=0)
    assert r.error_kinds["excess"] > 0, r
    assert r.errors >= r.error_kinds["excess"]


def test_stale_replies_are_caught() -> None:
    """Each message's payload differs from the last one's, so a reply that repeats the previous
    message (right length, right kind of bytes) is corrupt."""
    with broken_echo("stale") as port:
        r = bench("127.0.0.1", port, connections=2, duration=0.3, warmup=0)
    assert r.error_kinds["corrupt"] > 0, r


def test_latency_percentiles_come_from_the_measured_distribution() -> None:
    """One connection, one message at a time; every 20th reply is 50 ms late, the others come at
    once. So 95 % of the round trips are fast: p50 and p90 must be, while p99, p99.9 and the
    maximum must be at least the delay (the histogram reports a bucket's upper edge, never less
    than the value), and the mean lies in between."""
    slow_us = SLOW_REPLY_S * 1e6
    with broken_echo("slow") as port:
        r = bench("127.0.0.1", port, connections=1, size=64, duration=0.6, warmup=0)
    assert r.errors == 0, r.first_error
    assert r.round_trips >= 100, r
    assert r.p50_us <= r.p90_us < slow_us / 2, r
    assert slow_us <= r.p99_us <= r.p999_us <= r.max_us, r
    assert r.p90_us < r.mean_us < r.p99_us, r


def test_silent_server_is_caught() -> None:
    with broken_echo("drop") as port:
        r = bench("127.0.0.1", port, connections=3, duration=0.3, warmup=0, connect_timeout=1.0)
        assert r.errors == 3
        assert r.error_kinds["stalled"] == 3
        p = run_cli("--host", "127.0.0.1", "--port", str(port), "--connections", "1",
                    "--duration", "0.3", "--warmup", "0", "--connect-timeout", "0.5")  # fmt: skip
    assert p.returncode != 0


def test_refused_connections_are_counted() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = bench("127.0.0.1", port, connections=3, duration=0.2, warmup=0)
    assert r.error_kinds["connect_failed"] == 3
    assert r.requests_per_s == 0


def test_fixed_rate_is_roughly_achieved() -> None:
    r = bench(connections=10, duration=1.0, warmup=0.2, rate=2000, workers=1)
    assert r.errors == 0, r.first_error
    assert r.rate == 2000
    assert 0.9 * 2000 <= r.requests_per_s <= 1.1 * 2000


def test_rate_beyond_the_client_ends_on_time() -> None:
    """A rate the client cannot offer runs saturated for the duration asked, not longer (the
    schedule used to visit every missed slot, past the end of the run)."""
    t0 = time.monotonic()
    r = bench(connections=2, duration=0.5, warmup=0, rate=1e9, workers=1)
    assert time.monotonic() - t0 < 5.0
    assert r.errors == 0, r.first_error
    assert r.round_trips > 0 and r.duration_s == pytest.approx(0.5, abs=0.1)


def test_fixed_rate_with_a_silent_server_is_an_error() -> None:
    """At a fixed rate a server that answers nothing in the window is stalled, as without one
    (the priming echo is answered, so the connections are open when the window ends; before, the
    run counted 0 round trips and no error)."""
    with broken_echo("once") as port:
        r = bench("127.0.0.1", port, connections=2, duration=0.3, warmup=0, rate=100,
                  connect_timeout=2.0)  # fmt: skip
    assert r.connections_open == 2
    assert r.round_trips == 0
    assert r.error_kinds["stalled"] == 1, r.error_kinds
    assert r.first_error.startswith("stalled: no round trip in the window"), r.first_error


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration": 1e10},  # seconds beyond 1e6 overflowed the native nanosecond clock
        {"warmup": 1e300},
        {"connect_timeout": 2e6},
        {"rate": 1e11},
        {"connections": 0},
        {"size": 0},
        {"duration": 0},
        {"duration": float("nan")},
        {"warmup": -1},
        {"rate": 0},
        {"rate": -5},
        {"threads": 0},
        {"pipeline": 0},
        {"connections": True},
        # Too big for the native int/size_t: a TypeError from the binding before.
        {"host": "127.0.0.1", "port": 1, "connections": 10**10},
        {"host": "127.0.0.1", "port": 1, "size": 2**64},
        {"host": "127.0.0.1", "port": 1, "threads": 2**31},
        {"host": "127.0.0.1", "port": 1, "pipeline": 2**40},
        {"host": "127.0.0.1"},  # port missing
        {"host": "127.0.0.1", "port": 1, "workers": 2},  # server option with an external server
        {"backend": "nope"},
    ],
)
def test_bad_values_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bench(**kwargs)


@pytest.mark.parametrize(
    "args",
    [
        ["--connections", "0"],
        ["--size", "-1"],
        ["--duration", "0"],
        ["--rate", "0"],
        ["--rate", "1e12"],
        ["--duration", "1e10"],
        ["--threads", "0"],
        ["--host", "127.0.0.1", "--port", "1", "--connections", "10000000000"],  # a traceback
        ["--host", "127.0.0.1", "--port", "1", "--size", "100000000000000000000"],
        ["--host", "127.0.0.1", "--port", "1", "--workers", "2"],
    ],
)
def test_cli_bad_values(args: list[str]) -> None:
    p = run_cli(*args)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stdout == ""


def test_too_many_connections_for_own_server() -> None:
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no descriptor limit here")
    with pytest.raises(ValueError, match="file descriptors"):
        bench(connections=hard, duration=0.1)
