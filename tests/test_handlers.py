"""Python handlers on the native server (issue 8), on every backend available here.

TCP has no message boundaries, so every check below is independent of how the server's reads
split the stream: transforms are byte-wise, replies are framed, or the client waits for the
running total it expects.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from iocpnative import Server

TIMEOUT = 10.0


# `backend` (conftest.py) runs every test once per backend available here.
@pytest.fixture
def make_server(backend: str) -> Iterator[Callable[..., Server]]:
    """Starts handler servers on port 0 with the test's backend; stops them afterwards and
    checks that the pool was freed (shadows conftest's make_server: the handler comes first)."""
    started: list[Server] = []

    def make(handler: Any, **kw: Any) -> Server:
        kw.setdefault("workers", 2)
        srv = Server("127.0.0.1", 0, backend=backend, handler=handler, **kw).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop(TIMEOUT)
        st = srv.stats()
        assert (st.pool_in_use, st.pool_allocated, st.active_connections) == (0, 0, 0)


def connect(srv: Server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_closed(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (EOF or reset)."""
    buf = bytearray()
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except ConnectionResetError:
        pass
    return bytes(buf)


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_upper_case_transform(make_server: Callable[..., Server]) -> None:
    srv = make_server(bytes.upper, buffer_size=1000)
    with connect(srv) as s:
        for msg in (b"a", b"hello, World", bytes(range(256)) * 40, os.urandom(200_000)):
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg.upper()
    st = srv.stats()
    assert st.handler_errors == 0


def test_length_prefix_transform(make_server: Callable[..., Server]) -> None:
    """Each chunk comes back framed as <u32 length><chunk>: the frames rebuild the stream."""
    srv = make_server(lambda data: struct.pack("!I", len(data)) + data, buffer_size=4096)
    payload = os.urandom(300_000)
    with connect(srv) as s:
        s.sendall(payload)
        got = bytearray()
        frames = 0
        while len(got) < len(payload):
            (n,) = struct.unpack("!I", recv_exactly(s, 4))
            assert 1 <= n <= 4096  # a chunk is never empty nor larger than buffer_size
            got += recv_exactly(s, n)
            frames += 1
        assert bytes(got) == payload
        assert frames >= len(payload) // 4096


def test_none_sends_nothing(make_server: Callable[..., Server]) -> None:
    seen = bytearray()

    def swallow(data: bytes) -> None:
        seen.extend(data)

    srv = make_server(swallow)
    payload = os.urandom(100_000)
    with connect(srv) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_closed(s) == b""  # the server closes on EOF, having sent nothing
    wait_for(lambda: len(seen) == len(payload), "all data to reach the handler")
    assert bytes(seen) == payload
    st = srv.stats()
    assert (st.bytes_received, st.bytes_sent) == (len(payload), 0)


def test_replies_larger_than_buffer_arrive_complete_and_in_order(
    make_server: Callable[..., Server],
) -> None:
    """buffer_size=16: each 16-byte chunk's 1 MiB reply goes out 16 bytes at a time."""
    per_byte = 1 << 16

    def expand(data: bytes) -> bytes:
        return b"".join(bytes([b]) * per_byte for b in data)

    srv = make_server(expand, buffer_size=16, workers=1)
    with connect(srv) as s:
        for msg in (b"0123456789abcdef", b"ABCDEFGHIJKLMNOP"):
            s.sendall(msg)
            got = recv_exactly(s, len(msg) * per_byte)
            assert got == expand(msg)


def test_bytearray_and_memoryview_replies(make_server: Callable[..., Server]) -> None:
    replies: list[Callable[[bytes], object]] = [
        lambda d: bytearray(d.upper()),
        lambda d: memoryview(d.upper()),
        # A strided (non-contiguous) view: every other byte of the doubled chunk is the chunk.
        lambda d: memoryview(bytes(x for b in d for x in (b, 0))).cast("B")[::2],
    ]
    expected = [bytes.upper, bytes.upper, lambda d: d]
    for fn, want in zip(replies, expected, strict=True):
        srv = make_server(fn)
        with connect(srv) as s:
            msg = b"bytes-like: " + os.urandom(5000)
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == want(msg)
        assert srv.stats().handler_errors == 0


def test_exception_is_logged_closes_connection_others_unaffected(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    def picky(data: bytes) -> bytes:
        if b"boom" in data:
            raise ValueError("no booms here")
        return data.upper()

    srv = make_server(picky)
    with connect(srv) as good, connect(srv) as bad:
        good.sendall(b"first")
        assert recv_exactly(good, 5) == b"FIRST"
        with caplog.at_level(logging.ERROR, logger="iocpnative"):
            bad.sendall(b"boom")
            assert recv_until_closed(bad) == b""
            wait_for(lambda: srv.stats().handler_errors == 1, "handler_errors == 1")
        good.sendall(b"still served")
        assert recv_exactly(good, 12) == b"STILL SERVED"
    records = [r for r in caplog.records if r.name == "iocpnative"]
    assert len(records) == 1
    rec = records[0]
    assert rec.levelno == logging.ERROR
    assert rec.exc_info is not None and rec.exc_info[0] is ValueError
    text = caplog.text
    assert "Traceback" in text and "in picky" in text and "no booms here" in text


def test_wrong_return_type_is_a_handler_error(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    srv = make_server(lambda data: data.decode())  # str is not bytes-like
    with caplog.at_level(logging.ERROR, logger="iocpnative"), connect(srv) as s:
        s.sendall(b"text")
        assert recv_until_closed(s) == b""
        wait_for(lambda: srv.stats().handler_errors == 1, "handler_errors == 1")
    assert any(r.exc_info is not None and r.exc_info[0] is TypeError for r in caplog.records), (
        caplog.text
    )
    assert "must return bytes, bytearray, memoryview or None, not str" in caplog.text


def test_per_connection_state(make_server: Callable[..., Server]) -> None:
    totals: dict[int, int] = {}
    peers: dict[int, str] = {}
    closed: list[int] = []

    def on_connect(conn_id: int, peer: str) -> None:
        totals[conn_id] = 0
        peers[conn_id] = peer

    def count(conn_id: int, data: bytes) -> bytes:
        totals[conn_id] += len(data)  # KeyError if on_connect had not run first
        return b"%d %d\n" % (conn_id, totals[conn_id])

    srv = make_server(count, on_connect=on_connect, on_disconnect=closed.append)

    def read_total(f: Any, want: int) -> int:
        while True:
            cid, total = map(int, f.readline().split())
            if total == want:
                return cid

    socks = [connect(srv) for _ in range(3)]
    files = [s.makefile("rb") for s in socks]
    sent = [0, 0, 0]
    ids = [0, 0, 0]
    for rnd in range(5):
        for i, s in enumerate(socks):
            msg = b"x" * (1 + 100 * i + rnd)
            s.sendall(msg)
            sent[i] += len(msg)
            ids[i] = read_total(files[i], sent[i])
    assert len(set(ids)) == 3
    for i, s in enumerate(socks):
        host, port = s.getsockname()[:2]
        assert peers[ids[i]] == f"{host}:{port}"
        assert totals[ids[i]] == sent[i]
    for f, s in zip(files, socks, strict=True):
        f.close()
        s.close()
    wait_for(lambda: sorted(closed) == sorted(ids), "on_disconnect for every connection")


def test_callback_errors_are_logged_and_counted(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(conn_id: int, peer: str) -> None:
        raise PermissionError(f"{peer} not welcome")

    disconnected: list[int] = []
    srv = make_server(bytes.upper, on_connect=refuse, on_disconnect=disconnected.append)
    with caplog.at_level(logging.ERROR, logger="iocpnative"), connect(srv) as s:
        s.sendall(b"hi")
        assert recv_until_closed(s) == b""  # closed at once: the handler never ran
        wait_for(lambda: len(disconnected) == 1, "on_disconnect after a failed on_connect")
    assert srv.stats().handler_errors == 1
    assert "not welcome" in caplog.text and "in refuse" in caplog.text

    def broken(conn_id: int) -> None:
        raise RuntimeError("disconnect failed")

    srv = make_server(bytes.upper, on_disconnect=broken)
    with caplog.at_level(logging.ERROR, logger="iocpnative"):
        with connect(srv) as s:
            s.sendall(b"ok")
            assert recv_exactly(s, 2) == b"OK"
        wait_for(lambda: srv.stats().handler_errors == 1, "on_disconnect error counted")
    assert "disconnect failed" in caplog.text
    with connect(srv) as s:  # still serving
        s.sendall(b"again")
        assert recv_exactly(s, 5) == b"AGAIN"


def test_stop_does_not_wait_for_a_blocked_handler(backend: str) -> None:
    entered = threading.Event()
    release = threading.Event()
    calls = []

    def blocked(data: bytes) -> bytes:
        calls.append(data)
        entered.set()
        release.wait(30)  # blocks without the GIL, like any blocking I/O would
        return data

    srv = Server("127.0.0.1", 0, backend=backend, workers=1, handler=blocked).start()
    clients = [connect(srv) for _ in range(4)]
    try:
        for c in clients:
            c.sendall(b"wait")
        assert entered.wait(TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            srv.stop(0.2)
        # Returned on its own timeout, while the handler is still blocked.
        assert time.monotonic() - t0 < 5.0 and not release.is_set()
    finally:
        release.set()
    srv.stop(TIMEOUT)  # the handler returned: the drain completes
    n = len(calls)
    st = srv.stats()
    assert (st.pool_in_use, st.pool_allocated, st.active_connections) == (0, 0, 0)
    # The chunks still waiting when stop() came were dropped with their connections.
    assert n < 4 or len(calls) == n
    for c in clients:
        assert recv_until_closed(c) in (b"", b"wait")
        c.close()


def test_stop_during_slow_handlers(backend: str) -> None:
    """time.sleep in the handler: stop() times out while it sleeps, then completes cleanly."""
    entered = threading.Event()

    def slow(data: bytes) -> bytes:
        entered.set()
        time.sleep(1.0)
        return data

    srv = Server("127.0.0.1", 0, backend=backend, workers=2, handler=slow).start()
    clients = [connect(srv) for _ in range(6)]
    for c in clients:
        c.sendall(b"zz")
    assert entered.wait(TIMEOUT)
    with pytest.raises(TimeoutError):
        srv.stop(0.05)
    srv.stop(TIMEOUT)
    assert not srv.running
    st = srv.stats()
    assert (st.pool_in_use, st.pool_allocated, st.active_connections) == (0, 0, 0)
    for c in clients:
        c.close()


def test_gil_is_released_between_calls(make_server: Callable[..., Server]) -> None:
    """A Python thread keeps running while traffic flows through the handler."""
    ticks = 0
    done = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.0005)

    srv = make_server(bytes.upper)
    t = threading.Thread(target=ticker)
    t.start()
    try:
        with connect(srv) as s:
            before = ticks
            for i in range(2000):
                msg = b"msg %d" % i
                s.sendall(msg)
                assert recv_exactly(s, len(msg)) == msg.upper()
            during = ticks - before
    finally:
        done.set()
        t.join()
    assert during > 0


def test_handler_arity_and_argument_checks(backend: str) -> None:
    def three(a: bytes, b: bytes, c: bytes) -> bytes:
        return a

    with pytest.raises(ValueError, match="3 positional"):
        Server("127.0.0.1", 0, backend=backend, handler=three)

    def keyword_only(*, data: bytes) -> bytes:
        return data

    # Accepted before, then every chunk failed with a TypeError and closed its connection.
    for no_positional in (lambda: b"x", keyword_only):
        with pytest.raises(ValueError, match="no positional"):
            Server("127.0.0.1", 0, backend=backend, handler=no_positional)
    Server("127.0.0.1", 0, backend=backend, handler=lambda *args: args[-1])  # *args will do
    with pytest.raises(TypeError, match="callable"):
        Server("127.0.0.1", 0, backend=backend, handler=b"not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need a handler"):
        Server("127.0.0.1", 0, backend=backend, on_connect=lambda c, p: None)

    def with_default(data: bytes, suffix: bytes = b"!") -> bytes:
        return data + suffix  # one required parameter: called with the data alone

    with Server("127.0.0.1", 0, backend=backend, handler=with_default) as srv, connect(srv) as s:
        s.sendall(b"7")
        assert recv_exactly(s, 2) == b"7!"


@pytest.mark.parametrize("handler_body", ["d.upper()", "time.sleep(1.0) or d"])
def test_interpreter_exit_with_running_handler_server(backend: str, handler_body: str) -> None:
    """Exiting without stop() while traffic flows (or while a handler sleeps): exit code 0."""
    script = textwrap.dedent(
        f"""
        import socket, sys, threading, time
        import iocpnative
        srv = iocpnative.Server("127.0.0.1", 0, backend={backend!r}, workers=2,
                                handler=lambda d: {handler_body},
                                on_disconnect=lambda cid: None)
        srv.start()
        def pump():
            s = socket.create_connection(("127.0.0.1", srv.port))
            while True:
                s.sendall(b"x" * 100)
                s.recv(65536)
        for _ in range(4):
            threading.Thread(target=pump, daemon=True).start()
        time.sleep(0.3)
        print("exiting", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "exiting"


def _catches(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def _handler_module(tmp_path, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))


def _start_cli_server(cmd: list[str], cwd) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on 127.0.0.1:" not in line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"no listening line: {line!r}; stderr {err!r}")
    return proc, int(line.split("127.0.0.1:")[1].split()[0])


def _serve_upper_then_sigterm(cmd: list[str], cwd, msg: bytes) -> tuple[str, str, int]:
    """Starts `cmd` (an ``iocpnative server`` whose handler upper-cases), checks one echo of
    `msg`, stops it with SIGTERM and returns (stdout, stderr, exit status)."""
    proc, port = _start_cli_server(cmd, cwd)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg.upper()
        # SIGTERM once serve_forever() has installed its handler (SigCgt in /proc), so that
        # the signal means "stop gracefully" and not "die".
        wait_for(lambda: _catches(proc.pid, signal.SIGTERM), "the SIGTERM handler")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, err, proc.returncode


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cli_server_with_handler(backend: str) -> None:
    args = ["server", "--port", "0", "--workers", "1", "--backend", backend]
    cmd = [sys.executable, "-m", "iocpnative", *args, "--handler", "builtins:bytes.upper"]
    out, err, rc = _serve_upper_then_sigterm(cmd, None, b"shout")
    assert rc == 0, err
    assert "handler_errors=0" in out


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("def f(:\n", "SyntaxError"),
        ("raise KeyError('boom')\n", "KeyError"),
        ("import sys\nsys.exit(3)\n", "SystemExit"),
    ],
)
def test_cli_handler_module_failing_on_import(tmp_path, source: str, needle: str) -> None:
    """A handler module that fails while being imported is a one-line usage error, not a
    traceback (or, for sys.exit, a silent exit with the module's status)."""
    _handler_module(tmp_path, "badh", source)
    proc = subprocess.run(
        [sys.executable, "-m", "iocpnative", "server", "--port", "0", "--handler", "badh:f"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--handler badh:f" in proc.stderr and needle in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_console_script_finds_a_handler_in_the_current_directory(tmp_path) -> None:
    """`iocpnative server --handler mod:fn` looks in the current directory, as `python -m
    iocpnative` does (the script's own sys.path[0] is its bin/ folder)."""
    script = os.path.join(os.path.dirname(sys.executable), "iocpnative")
    if not os.path.exists(script):
        pytest.skip("the iocpnative console script is not installed (running from the sources)")
    _handler_module(tmp_path, "cwdhandler", "def shout(data):\n    return data.upper()\n")
    cmd = [script, "server", "--port", "0", "--workers", "1", "--handler", "cwdhandler:shout"]
    _, err, rc = _serve_upper_then_sigterm(cmd, tmp_path, b"from cwd")
    assert rc == 0, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("abandon", ["no", "after", "before"])
def test_cli_server_stopped_while_a_handler_blocks(tmp_path, abandon: str) -> None:
    """Ctrl-C while a handler runs: after a second the CLI says it waits for it, then stops with
    the final stats (exit 0); a second Ctrl-C abandons it (exit 1) at once, after that message
    or before it. Before: after 5 s an error telling a CLI user to "call stop() again", and a
    traceback on the second Ctrl-C."""
    _handler_module(
        tmp_path, "slowh",
        """
        import pathlib, time
        def slow(data):
            pathlib.Path("started").touch()
            time.sleep(4)
            return data
        """,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "iocpnative", "server", "--port", "0", "--workers", "1"]
    proc, port = _start_cli_server([*cmd, "--handler", "slowh:slow"], cwd=tmp_path)
    try:
        wait_for(lambda: _catches(proc.pid, signal.SIGINT), "the SIGINT handler")
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(b"slow")
            wait_for(lambda: (tmp_path / "started").exists(), "the handler to start")
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            assert proc.stderr is not None
            if abandon == "before":  # within the first stop step, before any message
                time.sleep(0.2)
                proc.send_signal(signal.SIGINT)
            else:
                line = proc.stderr.readline()
                assert "waiting for a handler to return" in line, line
                if abandon == "after":
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    if abandon != "no":
        assert proc.returncode == 1, err
        assert "abandoned" in err and elapsed < 2.5, (err, elapsed)
    else:
        assert proc.returncode == 0, err
        assert "final stats:" in out and "pool_in_use=0" in out, out


@pytest.mark.parametrize(
    "spec", ["no_colon", "iocpnative:does_not_exist", "no_such_mod_x:f", ".relative:f"]
)
def test_cli_bad_handler_spec(spec: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "iocpnative", "server", "--port", "0", "--handler", spec],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--handler" in proc.stderr
