"""The io_uring backend and the fallback to epoll.

The registry probes the backends once per process, so every test that makes the io_uring probe
fail on purpose (``IOCPNATIVE_DISABLE_IO_URING=1``) or overrides "auto" (``IOCPNATIVE_BACKEND``)
runs in a fresh interpreter. ``IOCPNATIVE_URING_DISABLE`` is read at every server start, so the
feature fallbacks run in-process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import iocpnative
from conftest import wait_until
from iocpnative import Client, Server, available_backends

DISABLED_REASON = "disabled by IOCPNATIVE_DISABLE_IO_URING"
URING = ["io_uring"] if "io_uring" in available_backends() else []

# Run in the child: resolve "auto", echo through it, report as JSON on stdout.
CHILD = textwrap.dedent(
    """
    import json
    import iocpnative
    out = {
        "available": iocpnative.available_backends(),
        "reasons": {s.name: s.reason for s in iocpnative.backend_statuses()},
    }
    with iocpnative.Server(port=0, workers=1) as srv:
        with iocpnative.Client(port=srv.port, timeout=5) as cli:
            out["echo"] = cli.request(b"ping").decode()
        out["resolved"] = srv.backend
    stats = srv.stats()
    out["pool"] = [stats.pool_in_use, stats.pool_allocated]
    print(json.dumps(out))
    """
)


def run_child(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("IOCPNATIVE_")}
    child_env.update(env)
    return subprocess.run(
        [sys.executable, *args], env=child_env, capture_output=True, text=True, timeout=60
    )


def test_failed_probe_falls_back_to_epoll_silently() -> None:
    r = run_child(["-c", CHILD], IOCPNATIVE_DISABLE_IO_URING="1")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # "auto" falls back without a word of error
    out = json.loads(r.stdout)
    assert "io_uring" not in out["available"]
    assert out["available"][0] == "epoll"
    assert out["reasons"]["io_uring"] == DISABLED_REASON
    assert out["resolved"] == "epoll"
    assert out["echo"] == "ping"
    assert out["pool"] == [0, 0]


def test_info_says_why_io_uring_is_unavailable() -> None:
    r = run_child(["-m", "iocpnative", "info"], IOCPNATIVE_DISABLE_IO_URING="1")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("io_uring"))
    assert line.split(None, 1)[1] == f"unavailable: {DISABLED_REASON}"


def test_asking_for_a_disabled_io_uring_is_a_value_error() -> None:
    code = textwrap.dedent(
        """
        import iocpnative
        try:
            iocpnative.Server(port=0, backend="io_uring")
        except ValueError as e:
            print(e)
        """
    )
    r = run_child(["-c", code], IOCPNATIVE_DISABLE_IO_URING="1")
    assert r.returncode == 0, r.stderr
    assert "backend 'io_uring' is not available here" in r.stdout
    assert DISABLED_REASON in r.stdout


@pytest.mark.parametrize("backend", available_backends())
def test_env_override_picks_the_backend_of_auto(backend: str) -> None:
    r = run_child(["-c", CHILD], IOCPNATIVE_BACKEND=backend)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["resolved"] == backend
    assert out["echo"] == "ping"
    assert out["pool"] == [0, 0]


def test_env_override_naming_a_disabled_io_uring_fails_clearly() -> None:
    r = run_child(["-c", CHILD], IOCPNATIVE_BACKEND="io_uring", IOCPNATIVE_DISABLE_IO_URING="1")
    assert r.returncode != 0
    assert "ValueError" in r.stderr
    assert DISABLED_REASON in r.stderr


def test_auto_takes_the_best_available_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOCPNATIVE_BACKEND", raising=False)
    statuses = {s.name: s for s in iocpnative.backend_statuses()}
    if statuses["io_uring"].compiled and statuses["io_uring"].available:
        assert available_backends()[0] == "io_uring"
    with Server(port=0, workers=1) as srv:
        assert srv.backend == available_backends()[0]


def _stop_with_data_in_flight(backend: str) -> None:
    srv = Server(port=0, workers=2, backend=backend, buffer_size=4096).start()
    idle = [Client(port=srv.port, timeout=5) for _ in range(20)]
    floods: list[socket.socket] = []
    try:
        blob = os.urandom(32 << 20)
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", srv.port))
            floods.append(s)
            s.settimeout(0.2)
            # The server echoes into a peer that never reads, until its sends block.
            with pytest.raises(TimeoutError):
                s.sendall(blob)
        with Client(port=srv.port, timeout=5) as cli:
            assert cli.request(b"x" * 100_000) == b"x" * 100_000
        deadline = time.monotonic() + 5
        while srv.stats().active_connections != 24 and time.monotonic() < deadline:
            time.sleep(0.01)
        during = srv.stats()
        assert during.active_connections == 24
        assert during.pool_in_use > 0
        srv.stop()
        after = srv.stats()
        assert (after.pool_in_use, after.pool_allocated, after.active_connections) == (0, 0, 0)
        for c in idle:
            assert c.recv() == b""  # the server closed them
    finally:
        srv.stop()
        for c in idle:
            c.close()
        for s in floods:
            s.close()


@pytest.mark.parametrize("backend", available_backends())
def test_stop_with_clients_and_data_in_flight_frees_the_pool(backend: str) -> None:
    _stop_with_data_in_flight(backend)


@pytest.mark.parametrize("backend", URING)
@pytest.mark.parametrize(
    "off",
    [
        "pbuf_ring",
        "multishot_recv",
        "multishot_accept",
        "defer_taskrun,single_issuer",
        "poll",
        "all",
    ],
)
def test_io_uring_fallbacks_echo_and_stop(
    backend: str, off: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOCPNATIVE_URING_DISABLE", off)
    with (
        Server(port=0, workers=2, backend=backend, buffer_size=1000) as srv,
        Client(port=srv.port, timeout=10) as cli,
    ):
        for n in (1, 999, 1000, 1001, 1 << 20):
            data = os.urandom(n)
            assert cli.request(data) == data
    _stop_with_data_in_flight(backend)


@pytest.mark.parametrize("backend", URING)
def test_large_messages_read_without_the_ring_copy_and_small_ones_go_back(backend: str) -> None:
    """A recv of 16 KiB or more switches the connection to recvs into an IoData of its own (no
    copy out of the buffer ring); two small ones in a row switch it back. Visible in the pool: a
    quiet connection in bulk mode holds its posted recv's IoData, one on the ring holds none."""
    big = os.urandom(256 * 1024)
    with (
        Server(port=0, workers=1, backend=backend) as srv,
        Client(port=srv.port, timeout=10) as cli,
    ):
        for _ in range(2):
            assert cli.request(big) == big
            wait_until(lambda: srv.stats().pool_in_use == 1, what="bulk recv posted")
            assert cli.request(b"small") == b"small"
            assert cli.request(b"small again") == b"small again"
            wait_until(lambda: srv.stats().pool_in_use == 0, what="back on the ring")
    stats = srv.stats()
    assert (stats.pool_in_use, stats.pool_allocated) == (0, 0)
