"""The Python API contract of issue 2: properties, lifecycle, argument checks, errors."""

from __future__ import annotations

import errno
import inspect
import math
import os
import re
import signal
import socket
import sys
import threading
import time

import pytest

import iocpnative
from conftest import assert_drained, is_closed_by_peer, raw_connect, recv_exactly, wait_until


def test_version_is_a_string() -> None:
    assert isinstance(iocpnative.__version__, str)
    assert iocpnative.__version__.count(".") >= 1


def test_available_backends_lists_usable_ones_best_first() -> None:
    names = iocpnative.available_backends()
    assert names, "at least one backend must be usable"
    assert all(isinstance(n, str) for n in names)
    assert "auto" not in names
    if sys.platform.startswith("linux"):
        assert "epoll" in names
        assert names[-1] == "epoll"  # the fallback that works everywhere comes last
    statuses = {st.name: st for st in iocpnative.backend_statuses()}
    for n in names:
        assert statuses[n].available and statuses[n].compiled and statuses[n].reason == ""
    for st in statuses.values():
        if not st.available:
            assert st.reason, f"{st.name} unavailable without a reason"
    # The order of available_backends() is the order of backend_statuses(), filtered.
    assert [s.name for s in iocpnative.backend_statuses() if s.available] == names


def test_auto_resolves_to_the_best_backend() -> None:
    with iocpnative.Server(port=0, workers=1) as srv:
        assert srv.backend == iocpnative.available_backends()[0]


def test_properties_after_start(make_server, backend: str) -> None:
    srv = make_server(start=False, workers=3)
    assert not srv.running
    assert srv.host == "127.0.0.1"
    assert srv.workers == 3
    assert srv.start() is srv
    assert srv.running
    assert 0 < srv.port <= 65535
    assert srv.backend == backend
    assert srv.workers == 3
    assert repr(srv).startswith("<iocpnative.Server 127.0.0.1:")
    srv.stop()
    assert not srv.running


def test_default_workers_is_cpu_count(make_server) -> None:
    srv = make_server(workers=None)
    assert srv.workers >= 1
    assert srv.backend != "auto"


def test_batch_wait_default_is_the_native_one_everywhere() -> None:
    """One default (config.hpp's kDefaultBatchWaitUs, 500 us as the README says) for the Python
    Server, the native constructor it calls and the CLI."""
    from iocpnative.cli import build_parser

    native = iocpnative._native.DEFAULT_BATCH_WAIT_US
    assert native == 500
    assert inspect.signature(iocpnative.Server).parameters["batch_wait_us"].default == native
    doc = iocpnative._native.Server.__init__.__doc__
    assert re.search(r"batch_wait_us: [^=]+= 500\)", doc), doc
    assert build_parser().parse_args(["server"]).batch_wait_us == native


def test_context_manager_starts_and_stops(backend: str) -> None:
    with iocpnative.Server(port=0, backend=backend, workers=1) as srv:
        assert srv.running
        with raw_connect(srv.port) as s:
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
    assert not srv.running
    assert_drained(srv)


def test_context_manager_stops_on_exception(backend: str) -> None:
    srv = iocpnative.Server(port=0, backend=backend, workers=1)
    with pytest.raises(KeyError), srv:
        raise KeyError("boom")
    assert not srv.running
    assert_drained(srv)


def test_stats_before_during_and_after_stop(make_server) -> None:
    srv = make_server(start=False)
    before = srv.stats()
    assert isinstance(before, iocpnative.ServerStats)
    assert all(v == 0 for v in before.as_dict().values())
    assert set(before.as_dict()) == {
        "active_connections",
        "total_connections",
        "rejected_connections",
        "bytes_received",
        "bytes_sent",
        "pool_in_use",
        "pool_allocated",
        "handler_errors",
        "recv_buffers",
    }
    srv.start()
    with raw_connect(srv.port) as s:
        s.sendall(b"x" * 100)
        assert recv_exactly(s, 100) == b"x" * 100
        # A send is counted when it returns, which may be just after we have the bytes.
        wait_until(lambda: srv.stats().bytes_sent == 100, what="bytes_sent counted")
        during = srv.stats()
        assert during.active_connections == 1
        assert during.total_connections == 1
        assert during.bytes_received == 100
        assert during.pool_allocated >= during.pool_in_use >= 0
        # io_uring registers a provided buffer ring; IOCP posts the connection's next read with
        # a buffer (after its first); epoll hands the kernel none.
        if srv.backend == "io_uring":
            assert during.recv_buffers > 0
        elif srv.backend == "iocp":
            wait_until(lambda: srv.stats().recv_buffers == 1, what="the next read posted")
        else:
            assert during.recv_buffers == 0
        srv.stop()
    after = srv.stats()
    assert all(isinstance(v, int) for v in after.as_dict().values())
    assert after.total_connections == 1
    assert after.bytes_received == after.bytes_sent == 100
    assert after.recv_buffers == 0
    assert_drained(srv)


def test_start_twice_raises_runtime_error(make_server) -> None:
    srv = make_server()
    with pytest.raises(RuntimeError, match="already running"):
        srv.start()
    assert srv.running
    srv.stop()
    with pytest.raises(RuntimeError):
        srv.start()  # a stopped server is not restarted either


def test_stop_is_idempotent_and_fine_before_start(make_server) -> None:
    srv = make_server(start=False)
    srv.stop()  # never started: nothing to do
    assert not srv.running
    srv.start()
    srv.stop()
    srv.stop()
    srv.stop(timeout=0.01)
    assert_drained(srv)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port must be .*0..65535"),
        ({"port": 65536}, "port must be .*0..65535"),
        ({"port": "x"}, "port must be .*0..65535"),
        ({"port": True}, "port must be .*0..65535"),
        ({"port": 1.5}, "port must be .*0..65535"),
        ({"workers": 0}, "workers must be an integer in 1\\.\\."),
        ({"workers": -2}, "workers must be an integer in 1\\.\\."),
        ({"workers": 1.0}, "workers must be an integer in 1\\.\\."),
        ({"workers": 2**40}, "workers must be an integer in 1\\.\\."),
        ({"workers": 1025}, "workers must be an integer in 1\\.\\.1024"),
        ({"buffer_size": 0}, "buffer_size must be an integer in 1\\.\\.67108864"),
        ({"buffer_size": (64 << 20) + 1}, "buffer_size must be an integer in 1\\.\\.67108864"),
        ({"buffer_size": 2**64}, "buffer_size must be an integer in 1\\.\\.67108864"),
        ({"max_connections": 0}, "max_connections must be an integer in 1\\.\\."),
        ({"max_connections": 2**64}, "max_connections must be an integer in 1\\.\\."),
        ({"idle_timeout": 0}, "idle_timeout must be .*> 0"),
        ({"idle_timeout": -1}, "idle_timeout must be .*> 0"),
        ({"idle_timeout": math.nan}, "idle_timeout must be .*> 0"),
        ({"idle_timeout": math.inf}, "idle_timeout must be .*> 0"),
        ({"idle_timeout": "1"}, "idle_timeout must be .*> 0"),
        ({"batch_wait_us": -1}, "batch_wait_us must be an integer in 0\\.\\.1000000"),
        ({"batch_wait_us": 1_000_001}, "batch_wait_us must be an integer in 0\\.\\.1000000"),
        ({"batch_wait_us": 2**64}, "batch_wait_us must be an integer in 0\\.\\.1000000"),
        ({"batch_wait_us": 1.5}, "batch_wait_us must be an integer"),
        ({"batch_wait_us": True}, "batch_wait_us must be an integer"),
        ({"backend": "kqueue"}, "backend must be one of .*epoll"),
        ({"backend": None}, "backend must be one of"),
        ({"host": ""}, "host must be a non-empty string"),
        ({"host": "127.0.0.1\x00junk"}, "host must not contain a NUL"),  # bound 127.0.0.1
        ({"verbose": "no"}, "verbose must be True or False"),  # a non-empty string was True
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iocpnative.Server(**{"port": 0, **kwargs})


def test_backend_not_available_here_names_the_usable_ones() -> None:
    unusable = [st.name for st in iocpnative.backend_statuses() if not st.available]
    if sys.platform.startswith("linux"):
        assert "iocp" in unusable
    for name in unusable:
        with pytest.raises(ValueError, match=name) as info:
            iocpnative.Server(port=0, backend=name)
        for usable in iocpnative.available_backends():
            assert usable in str(info.value)


def test_serve_forever_poll_interval_is_checked_before_starting() -> None:
    srv = iocpnative.Server(port=0)
    # -1 and 0 busy-spun; "x" failed after the start, 1e300 too (OverflowError in Event.wait)
    for bad in (-1, 0, math.nan, "x", 1e300):
        with pytest.raises(ValueError, match="poll_interval must be"):
            srv.serve_forever(poll_interval=bad)  # type: ignore[arg-type]
        assert not srv.running


def test_stop_timeout_must_be_positive(make_server) -> None:
    srv = make_server()
    for bad in (0, -1, math.nan, None):
        with pytest.raises(ValueError, match="timeout must be"):
            srv.stop(timeout=bad)
    assert srv.running


def test_huge_timeouts_mean_never(make_server) -> None:
    """Timeouts far beyond any real wait must not overflow the native clocks and counters."""
    srv = make_server(idle_timeout=1e300, workers=1)
    idle = raw_connect(srv.port)
    with idle, iocpnative.Client(port=srv.port, timeout=1e300) as cli:
        assert cli.request(b"patient") == b"patient"
        time.sleep(0.2)  # an overflowed idle timeout would close both at once
        assert not is_closed_by_peer(idle)
        assert cli.request(b"still open") == b"still open"
        stopper = threading.Thread(target=srv.stop, kwargs={"timeout": 1e300}, daemon=True)
        stopper.start()
        stopper.join(10.0)
        assert not stopper.is_alive(), "stop(timeout=1e300) hangs"
    assert_drained(srv)


def test_port_in_use_raises_eaddrinuse(make_server, backend: str) -> None:
    first = make_server()
    second = make_server(start=False, port=first.port)
    with pytest.raises(OSError) as info:
        second.start()
    assert info.value.errno == errno.EADDRINUSE
    assert not second.running
    assert first.running


def test_port_held_by_a_plain_socket_raises_eaddrinuse(make_server) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        srv = make_server(start=False, port=holder.getsockname()[1])
        with pytest.raises(OSError) as info:
            srv.start()
        assert info.value.errno == errno.EADDRINUSE


def test_start_again_after_the_port_was_taken(make_server) -> None:
    """README: a start() that failed before any worker ran leaves the server as it was."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        srv = make_server(start=False, port=port)
        with pytest.raises(OSError):
            srv.start()
        assert not srv.running
    srv.start()
    assert srv.running
    assert srv.port == port
    with iocpnative.Client(port=port) as cli:
        assert cli.request(b"second start") == b"second start"
    srv.stop()
    assert_drained(srv)


def test_failed_start_leaves_no_fds_or_threads(make_server, baseline) -> None:
    first = make_server()
    after_first = type(baseline).now()
    for _ in range(3):
        with pytest.raises(OSError):
            make_server(start=False, port=first.port).start()
    assert type(baseline).now() == after_first


def test_handler_arguments_are_checked_before_any_socket() -> None:
    # Behaviour of handlers is covered in test_handlers.py; here only the argument checks.
    iocpnative.Server(port=0, handler=lambda data: data)
    with pytest.raises(TypeError):
        iocpnative.Server(port=0, handler="upper")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        iocpnative.Server(port=0, on_disconnect=lambda conn_id: None)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback in this environment")
def test_ipv6_host(make_server) -> None:
    srv = make_server(host="::1")
    assert srv.host == "::1"
    with raw_connect(srv.port, host="::1") as s:
        s.sendall(b"over ipv6")
        assert recv_exactly(s, 9) == b"over ipv6"
    with iocpnative.Client("::1", srv.port) as cli:
        assert cli.request(b"client v6") == b"client v6"


def test_concurrent_stops_all_return_after_the_drain(make_server) -> None:
    errors: list[BaseException] = []
    for _ in range(20):
        srv = make_server()
        clients = [iocpnative.Client(port=srv.port) for _ in range(3)]
        barrier = threading.Barrier(3)

        def stop(srv: iocpnative.Server = srv, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=5.0)
            try:
                srv.stop()
                assert_drained(srv)  # whichever stop() returns, the work is done
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=stop, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
        for cli in clients:
            cli.close()
        assert not any(t.is_alive() for t in threads), "a concurrent stop() hangs"
        assert not errors, errors


def test_serve_forever_until_stop_from_another_thread(make_server) -> None:
    srv = make_server(start=False)
    seen: list[int] = []
    served = threading.Thread(
        target=srv.serve_forever, kwargs={"poll_interval": 0.05, "ready": lambda: seen.append(1)}
    )
    served.start()
    wait_until(lambda: srv.running and seen, what="serve_forever running")
    with iocpnative.Client(port=srv.port) as cli:
        assert cli.request(b"forever") == b"forever"
        srv.stop()
    served.join(10.0)
    assert not served.is_alive()
    assert_drained(srv)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_forever_stops_gracefully_on_signal(make_server, sig: int) -> None:
    srv = make_server(start=False)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def send_signal_when_serving() -> None:
        wait_until(lambda: srv.running, what="serving")
        with iocpnative.Client(port=srv.port) as cli:
            assert cli.request(b"signalled") == b"signalled"
            os.kill(os.getpid(), sig)
            wait_until(lambda: not srv.running, what="stopped by the signal")

    t = threading.Thread(target=send_signal_when_serving)
    t.start()
    srv.serve_forever(poll_interval=0.05)  # main thread: its signal handlers are installed
    t.join(10.0)
    assert_drained(srv)
    assert srv.stats().total_connections == 1
    assert {s: signal.getsignal(s) for s in before} == before  # previous handlers restored
