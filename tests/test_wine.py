"""The Windows build under wine: ``iocpnative-server.exe`` (IOCP backend, MinGW-w64) driven
from Linux with ``iocpnative.Client``, raw sockets and ``iocpnative-client.exe``.

``nox -s mingw`` cross-builds the executables and sets ``IOCPNATIVE_WINE_SERVER`` and
``IOCPNATIVE_WINE_CLIENT`` to their paths (and ``WINEPREFIX`` to a fresh prefix in the
temporary directory, removed afterwards). Without those variables, e.g. in ``nox -s test``,
these tests are skipped.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import iocpnative

pytestmark = pytest.mark.wine

SERVER_EXE = os.environ.get("IOCPNATIVE_WINE_SERVER", "")
CLIENT_EXE = os.environ.get("IOCPNATIVE_WINE_CLIENT", "")
WINE = os.environ.get("IOCPNATIVE_WINE", "wine")


@pytest.fixture(autouse=True)
def _needs_wine_build() -> None:
    # `nox -s test` deselects these tests (-m "not wine"); a plain pytest run says why they
    # cannot run without the MinGW build.
    if not SERVER_EXE:
        pytest.skip(
            "IOCPNATIVE_WINE_SERVER is not set: the wine tests run in `nox -s mingw`, which "
            "cross-builds iocpnative-server.exe and points this variable at it"
        )


STARTUP_S = 60.0  # a cold wine process can take seconds to start
LISTEN_RE = re.compile(r"listening on (\S+):(\d+) \(backend (\w+), (\d+) workers\)")


def _stats_from(line: str) -> dict[str, int]:
    assert line.startswith("final stats: "), line
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[2:])}


class WineServer:
    """One iocpnative-server.exe process under wine; stop() interrupts it (SIGINT, which wine
    turns into CTRL_C_EVENT for SetConsoleCtrlHandler) and parses its final stats."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        assert Path(SERVER_EXE).is_file(), f"IOCPNATIVE_WINE_SERVER={SERVER_EXE} does not exist"
        self.proc = subprocess.Popen(
            [WINE, SERVER_EXE, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        line = self._wait_for(lambda s: LISTEN_RE.search(s) is not None, STARTUP_S)
        m = LISTEN_RE.search(line)
        assert m is not None
        self.host, self.port, self.backend, self.workers = (
            m.group(1),
            int(m.group(2)),
            m.group(3),
            int(m.group(4)),
        )
        assert self.backend == "iocp"
        self.stats: dict[str, int] | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _wait_for(self, pred, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"server output did not arrive in {timeout} s: {self.output}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"server exited early ({self.proc.wait()}): {self.output}")
            self.output.append(line)
            if pred(line):
                return line

    def wait_stats(self, timeout: float = 60.0) -> dict[str, int]:
        line = self._wait_for(lambda s: s.startswith("final stats: "), timeout)
        self.stats = _stats_from(line)
        assert self.proc.wait(timeout=timeout) == 0, self.output
        return self.stats

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        return self.wait_stats()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._pump_thread.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def wine_server() -> Iterator[Callable[..., WineServer]]:
    started: list[WineServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WineServer:
        srv = WineServer(*args, env=env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()


def _assert_freed(stats: dict[str, int]) -> None:
    assert stats["active_connections"] == 0, stats
    assert stats["pool_in_use"] == 0, stats
    assert stats["pool_allocated"] == 0, stats


def test_seed_messages(wine_server) -> None:
    srv = wine_server("--workers", "2")
    with iocpnative.Client(srv.host, srv.port, timeout=30) as cli:
        for n in range(1, 6):
            assert cli.request(f"No:{n}".encode()) == f"No:{n}".encode()
    replies: list[bytes] = []
    got = iocpnative.run_client_loop(
        srv.host, srv.port, interval=0, count=3, timeout=30,
        on_reply=lambda _n, r: replies.append(r),
    )  # fmt: skip
    assert got == 3
    assert replies == [b"No:1", b"No:2", b"No:3"]
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["total_connections"] == 2
    assert stats["bytes_received"] == stats["bytes_sent"] == 5 * 4 + 3 * 4


def test_client_exe_against_server_exe(wine_server) -> None:
    assert Path(CLIENT_EXE).is_file(), f"IOCPNATIVE_WINE_CLIENT={CLIENT_EXE} does not exist"
    srv = wine_server("--workers", "2")
    out = subprocess.run(
        [WINE, CLIENT_EXE, "--port", str(srv.port), "--count", "3", "--interval", "0.1"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert lines == ["Recv: No:1", "Recv: No:2", "Recv: No:3", "3 replies received"]
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["total_connections"] == 1
    assert stats["bytes_sent"] == 12


def test_concurrent_clients(wine_server) -> None:
    srv = wine_server("--workers", "4", "--buffer-size", "1024")
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            rng = random.Random(i)
            with iocpnative.Client(srv.host, srv.port, timeout=60) as cli:
                for _ in range(20):
                    msg = rng.randbytes(rng.randint(1, 5000))
                    assert cli.request(msg) == msg
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["total_connections"] == 16
    assert stats["bytes_received"] == stats["bytes_sent"] > 0


@pytest.mark.parametrize("skip_on_success", ["1", "0"])
def test_binary_payloads_up_to_several_mib(wine_server, skip_on_success: str) -> None:
    # A small buffer turns each payload into many recv completions and sends.
    srv = wine_server(
        "--workers", "3", "--buffer-size", "4096",
        env={"IOCPNATIVE_IOCP_SKIP_ON_SUCCESS": skip_on_success},
    )  # fmt: skip
    rng = random.Random(42)
    sizes = [1, 255, 4096, 4097, 65536, 1 << 20, 6 << 20]
    with iocpnative.Client(srv.host, srv.port, timeout=120) as cli:
        for size in sizes:
            payload = rng.randbytes(size)
            assert cli.request(payload) == payload, size
        every_byte = bytes(range(256)) * 64
        assert cli.request(every_byte) == every_byte
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["bytes_received"] == stats["bytes_sent"] == sum(sizes) + len(every_byte)


def test_raw_socket_pieces_and_half_close(wine_server) -> None:
    srv = wine_server("--workers", "2")
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        for piece in (b"N", b"o", b":", b"1"):
            s.sendall(piece)
            time.sleep(0.02)
        got = b""
        while len(got) < 4:
            got += s.recv(16)
        assert got == b"No:1"
        s.sendall(b"No:2")
        s.shutdown(socket.SHUT_WR)  # the server echoes what it has, then closes on EOF
        rest = b""
        while chunk := s.recv(16):
            rest += chunk
        assert rest == b"No:2"
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["bytes_sent"] == 8


def test_clients_connected_at_shutdown(wine_server) -> None:
    srv = wine_server("--workers", "4", "--buffer-size", "4096")
    idle = [iocpnative.Client(srv.host, srv.port, timeout=30) for _ in range(6)]
    for i, cli in enumerate(idle):
        assert cli.request(f"No:{i}".encode()) == f"No:{i}".encode()
    # Peers that send without reading: the server's sends stall, so operations are in
    # flight at the moment of the stop.
    flooders = []
    for _ in range(3):
        s = socket.create_connection((srv.host, srv.port), timeout=30)
        s.setblocking(False)
        blob = os.urandom(1 << 20)
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sent += s.send(blob)
            except BlockingIOError:
                break
        assert sent > 0
        flooders.append(s)
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["total_connections"] == 9
    for cli in idle:  # each sees the server close: EOF, or a reset
        with contextlib.suppress(ConnectionError):
            assert cli.recv() == b""
        cli.close()
    for s in flooders:
        s.close()


def test_run_limit_stops_with_clients_connected(wine_server) -> None:
    srv = wine_server("--workers", "2", "--run-seconds", "4")
    clients = [iocpnative.Client(srv.host, srv.port, timeout=30) for _ in range(4)]
    for cli in clients:
        assert cli.request(b"No:1") == b"No:1"
    stats = srv.wait_stats()
    assert "stopping: run limit reached" in srv.output
    _assert_freed(stats)
    assert stats["total_connections"] == 4
    for cli in clients:
        cli.close()


def test_listener_survives_reset_storm(wine_server) -> None:
    srv = wine_server("--workers", "2")
    linger0 = struct.pack("ii", 1, 0)
    for _ in range(100):  # connect, then reset (RST) at once
        s = socket.create_connection((srv.host, srv.port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.close()
    with iocpnative.Client(srv.host, srv.port, timeout=30) as cli:
        assert cli.request(b"still here") == b"still here"
    stats = srv.stop()
    _assert_freed(stats)
    # Each reset peer was either accepted (and then closed on its error) or dropped before
    # its accept completed and the accept re-posted; the listener served the last client.
    assert stats["bytes_sent"] == len(b"still here")


def test_idle_timeout_and_max_connections(wine_server) -> None:
    srv = wine_server("--workers", "3", "--idle-timeout", "0.5", "--max-connections", "2")
    a = iocpnative.Client(srv.host, srv.port, timeout=30)
    b = iocpnative.Client(srv.host, srv.port, timeout=30)
    assert a.request(b"a") == b"a"
    assert b.request(b"b") == b"b"
    with (
        iocpnative.Client(srv.host, srv.port, timeout=30) as extra,
        contextlib.suppress(ConnectionError),
    ):
        assert extra.recv() == b""  # accepted and closed at once
    # Both stay silent: the idle scan (another worker) closes them.
    for cli in (a, b):
        with contextlib.suppress(ConnectionError):
            assert cli.recv() == b""
        cli.close()
    stats = srv.stop()
    _assert_freed(stats)
    assert stats["rejected_connections"] == 1
    assert stats["total_connections"] == 2
