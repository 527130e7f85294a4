"""The blocking Client and run_client_loop: happy paths and every documented error."""

from __future__ import annotations

import array
import errno
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import iocpnative
from conftest import recv_exactly, wait_until


def free_closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Run ``behaviour(conn)`` for one accepted connection in a Python thread; returns the port."""
    lsocks: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(behaviour: Callable[[socket.socket], None]) -> int:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsocks.append(lsock)

        def serve() -> None:
            conn, _ = lsock.accept()
            with conn:
                behaviour(conn)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return int(lsock.getsockname()[1])

    yield start
    for t in threads:
        t.join(10.0)
    for s in lsocks:
        s.close()


def test_send_recv_request_close(server) -> None:
    cli = iocpnative.Client(port=server.port)
    assert not cli.closed
    assert cli.send(b"hello") == 5
    assert cli.send(bytearray(b" world")) == 6
    got = b""
    while len(got) < 11:
        chunk = cli.recv(4)
        assert 0 < len(chunk) <= 4
        got += chunk
    assert got == b"hello world"
    assert cli.request(b"echo me") == b"echo me"
    assert cli.request(b"") == b""
    cli.close()
    assert cli.closed
    cli.close()  # idempotent


def test_context_manager_closes(server) -> None:
    with iocpnative.Client("127.0.0.1", server.port, timeout=2.0) as cli:
        assert cli.request(b"x") == b"x"
    assert cli.closed
    wait_until(lambda: server.stats().active_connections == 0, what="server saw the close")


def test_recv_returns_empty_at_eof(server) -> None:
    with iocpnative.Client(port=server.port) as cli:
        assert cli.request(b"last words") == b"last words"
        cli.shutdown_write()  # the server reads EOF and closes its side
        assert cli.recv() == b""
        assert cli.recv(10) == b""


def test_recv_of_data_then_eof_after_server_stop(make_server) -> None:
    srv = make_server()
    with iocpnative.Client(port=srv.port) as cli:
        assert cli.request(b"before stop") == b"before stop"
        srv.stop()
        assert cli.recv() == b""


def test_connection_refused() -> None:
    with pytest.raises(ConnectionRefusedError) as info:
        iocpnative.Client(port=free_closed_port(), timeout=2.0)
    assert info.value.errno == errno.ECONNREFUSED


def test_timeout_when_server_never_answers() -> None:
    with socket.socket() as lsock:  # listens (the kernel completes the handshake), never reads
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        with iocpnative.Client(port=lsock.getsockname()[1], timeout=0.3) as cli:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                cli.request(b"anyone there?")
            assert 0.25 <= time.monotonic() - t0 < 3.0
            with pytest.raises(TimeoutError):
                cli.recv()


def test_timeout_when_the_reply_stops_halfway(raw_server) -> None:
    def answer_half_then_wait(conn: socket.socket) -> None:
        data = recv_exactly(conn, 10)
        conn.sendall(data[:5])
        conn.recv(1)  # until the client gives up and closes

    port = raw_server(answer_half_then_wait)
    with iocpnative.Client(port=port, timeout=0.3) as cli:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            cli.request(b"0123456789")
        # One timeout in all, not one for the blocking read and another for what follows it.
        assert 0.25 <= time.monotonic() - t0 < 0.55


def test_timeout_none_waits_without_limit(raw_server) -> None:
    """Client's docstring: timeout=None sets no deadline (a slow reply is waited for)."""

    def echo_late(conn: socket.socket) -> None:
        data = recv_exactly(conn, 4)
        time.sleep(0.3)
        conn.sendall(data)

    port = raw_server(echo_late)
    with iocpnative.Client(port=port, timeout=None) as cli:
        assert cli.request(b"late") == b"late"


@pytest.mark.parametrize("call", ["request", "recv"])
def test_a_signal_while_waiting_loses_nothing(raw_server, call: str) -> None:
    """A signal while request() or recv() waits for data (EINTR) neither loses nor repeats bytes."""
    main = threading.get_ident()
    caught: list[int] = []

    def echo_late(conn: socket.socket) -> None:
        data = recv_exactly(conn, 10)
        time.sleep(0.1)  # the client is blocked in its read by now
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.1)
        conn.sendall(data[:4])
        time.sleep(0.05)
        conn.sendall(data[4:])
        conn.recv(1)

    old = signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
    try:
        port = raw_server(echo_late)
        with iocpnative.Client(port=port, timeout=5.0) as cli:
            if call == "request":
                assert cli.request(b"0123456789") == b"0123456789"
            else:
                cli.send(b"0123456789")
                got = cli.recv()  # what has arrived once the signal is handled
                assert got and b"0123456789".startswith(got)
                while len(got) < 10:
                    got += cli.recv()
                assert got == b"0123456789"
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert caught == [signal.SIGUSR1]


def test_connection_error_when_server_closes_mid_request(raw_server) -> None:
    def read_some_and_close(conn: socket.socket) -> None:
        recv_exactly(conn, 10)

    port = raw_server(read_some_and_close)
    with iocpnative.Client(port=port, timeout=5.0) as cli, pytest.raises(ConnectionError):
        cli.request(b"0123456789" * 1000)


def test_connection_error_on_short_reply(raw_server) -> None:
    def answer_half(conn: socket.socket) -> None:
        data = recv_exactly(conn, 10)
        conn.sendall(data[:5])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)

    port = raw_server(answer_half)
    with iocpnative.Client(port=port, timeout=5.0) as cli, pytest.raises(ConnectionError):
        cli.request(b"0123456789")


def test_bytes_like_payloads(server) -> None:
    with iocpnative.Client(port=server.port) as cli:
        ints = array.array("i", [1, -2, 3])
        assert cli.request(ints) == ints.tobytes()
        assert cli.request(memoryview(b"abcdef")[1:4]) == b"bcd"
        strided = memoryview(bytes(range(100)))[::2]
        for call in (cli.send, cli.request):
            with pytest.raises(BufferError, match="contiguous"):
                call(strided)  # never the wrong bytes
        with pytest.raises(TypeError):
            cli.send("text is not bytes")  # type: ignore[arg-type]
        assert cli.request(b"intact") == b"intact"


def test_closed_client_raises_oserror(server) -> None:
    cli = iocpnative.Client(port=server.port)
    cli.close()
    for call in (lambda: cli.send(b"x"), lambda: cli.recv(), lambda: cli.request(b"x")):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port must be"),
        ({"port": 65536}, "port must be"),
        ({"port": "6000"}, "port must be"),
        ({"timeout": 0}, "timeout must be"),
        ({"timeout": -1.0}, "timeout must be"),
        ({"host": ""}, "host must be"),
    ],
)
def test_client_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iocpnative.Client(**{"port": 1, **kwargs})


def test_recv_bad_max_bytes(server) -> None:
    with iocpnative.Client(port=server.port) as cli:
        for bad in (0, -1, 1.5):
            with pytest.raises(ValueError, match="max_bytes"):
                cli.recv(bad)


def test_run_client_loop_with_callback(server) -> None:
    replies: list[tuple[int, bytes]] = []
    n = iocpnative.run_client_loop(
        port=server.port, count=3, interval=0, on_reply=lambda i, r: replies.append((i, r))
    )
    assert n == 3
    assert replies == [(1, b"No:1"), (2, b"No:2"), (3, b"No:3")]
    assert server.stats().bytes_received == len(b"No:1No:2No:3")


def test_run_client_loop_prints_replies(server, capsys: pytest.CaptureFixture[str]) -> None:
    assert iocpnative.run_client_loop("127.0.0.1", server.port, count=3, interval=0.0) == 3
    assert capsys.readouterr().out.splitlines() == ["Recv: No:1", "Recv: No:2", "Recv: No:3"]


def test_run_client_loop_errors(server) -> None:
    with pytest.raises(ValueError, match="interval"):
        iocpnative.run_client_loop(port=server.port, interval=-1, count=1)
    with pytest.raises(ValueError, match="count"):
        iocpnative.run_client_loop(port=server.port, interval=0, count=0)
    # Finite, but beyond what time.sleep() takes: an OverflowError after the first reply before.
    for huge in (1e10, 1e300):
        with pytest.raises(ValueError, match="interval"):
            iocpnative.run_client_loop(port=server.port, interval=huge, count=2)
    assert server.stats().total_connections == 0  # refused before connecting
    with pytest.raises(ConnectionRefusedError):
        iocpnative.run_client_loop(port=free_closed_port(), interval=0, count=1)
