"""The command line, run as a user runs it: ``python -m iocpnative ...`` in a subprocess."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import iocpnative
from conftest import wait_until

CMD = [sys.executable, "-m", "iocpnative"]
FINAL_STATS = re.compile(r"^final stats: .*\bpool_in_use=0 pool_allocated=0\b", re.M)


def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMD, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


class ServerProcess:
    """``iocpnative server`` in a subprocess, its output lines read by background threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CMD, "server", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        line = self.next_line(self.out, self.stdout_lines)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, f"no listening line: {line!r}"
        self.port = int(m.group(1))

    @staticmethod
    def _pump(stream, q: queue.Queue[str]) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))
        stream.close()

    def next_line(self, q: queue.Queue[str], keep: list[str], timeout: float = 15.0) -> str:
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output within {timeout}s; so far {keep}")
        keep.append(line)
        return line

    def wait_stderr(self, pattern: str) -> str:
        while True:
            line = self.next_line(self.err, self.stderr_lines)
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float = 15.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(timeout)
        while not self.out.empty():
            self.stdout_lines.append(self.out.get())
        while not self.err.empty():
            self.stderr_lines.append(self.err.get())
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


@pytest.fixture
def server_process(backend: str) -> Iterator[type[ServerProcess]]:
    made: list[ServerProcess] = []

    def factory(*args: str) -> ServerProcess:
        sp = ServerProcess("--backend", backend, "--workers", "2", *args)
        made.append(sp)
        return sp

    yield factory  # type: ignore[misc]
    for sp in made:
        sp.kill()


def test_info_lists_backends() -> None:
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"iocpnative {iocpnative.__version__}\n")
    for st in iocpnative.backend_statuses():
        line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == [st.name])
        if st.available:
            assert line.split()[1] == "available"
        else:
            assert "unavailable" in line and st.reason in line


def test_version_flag() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"iocpnative {iocpnative.__version__}"


def test_demo(backend: str) -> None:
    proc = run("demo", "--backend", backend)
    assert proc.returncode == 0, proc.stderr
    assert "Recv: No:1\nRecv: No:2\nRecv: No:3\n" in proc.stdout
    assert "client received 3 of 3 replies" in proc.stdout
    assert FINAL_STATS.search(proc.stdout), proc.stdout
    assert "total_connections=1" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_server_serves_and_stops_gracefully_on_signal(server_process, sig: int) -> None:
    sp = server_process()
    with iocpnative.Client(port=sp.port) as cli:
        assert cli.request(b"via the cli server") == b"via the cli server"
        # Stop with a client still connected: the pool must still end empty.
        sp.proc.send_signal(sig)
        assert sp.finish() == 0, sp.stderr_lines
    out = "\n".join(sp.stdout_lines)
    assert FINAL_STATS.search(out), out
    assert "total_connections=1" in out
    assert "bytes_received=18" in out
    assert not any("Traceback" in ln for ln in sp.stderr_lines), sp.stderr_lines


def test_server_batch_wait_flag(server_process) -> None:
    sp = server_process("--batch-wait-us", "0")
    with iocpnative.Client(port=sp.port) as cli:
        assert cli.request(b"at once") == b"at once"
    sp.proc.send_signal(signal.SIGINT)
    assert sp.finish() == 0, sp.stderr_lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_server_signal_right_after_listening_line(server_process, sig: int) -> None:
    """The listening line means ready: a signal at once must also stop it gracefully."""
    for _ in range(5):  # the race it guards against is narrow: try it a few times
        sp = server_process()
        sp.proc.send_signal(sig)
        assert sp.finish() == 0, sp.stderr_lines
        assert FINAL_STATS.search("\n".join(sp.stdout_lines)), sp.stdout_lines


def test_server_verbose_logs_connects_and_disconnects(server_process) -> None:
    sp = server_process("-v")
    with iocpnative.Client(port=sp.port) as cli:
        assert cli.request(b"hi") == b"hi"
        line = sp.wait_stderr(r"connection \d+ from")
        assert "127.0.0.1" in line
    sp.wait_stderr(r"connection \d+ closed")
    sp.proc.send_signal(signal.SIGINT)
    assert sp.finish() == 0


def test_client_against_cli_server(server_process) -> None:
    sp = server_process()
    proc = run("client", "--port", str(sp.port), "--count", "3", "--interval", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "Recv: No:1",
        "Recv: No:2",
        "Recv: No:3",
        "3 replies received",
    ]
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.finish() == 0
    assert "total_connections=1" in "\n".join(sp.stdout_lines)


def test_client_when_server_stops_midway(server_process) -> None:
    sp = server_process()
    cli = subprocess.Popen(
        [*CMD, "client", "--port", str(sp.port), "--interval", "0.02", "--count", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None
        assert cli.stdout.readline() == "Recv: No:1\n"
        sp.proc.send_signal(signal.SIGTERM)
        assert sp.finish() == 0
        out, err = cli.communicate(timeout=20)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    proc = subprocess.CompletedProcess(cli.args, cli.returncode, out, err)
    # EOF, or a reset if the server's RST beats the read: either way one line, exit 1.
    assert_one_line_error(proc, "iocpnative client: error:")
    assert proc.returncode == 1


def test_client_unreachable_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run("client", "--port", str(port), "--count", "1")
    assert_one_line_error(proc, "iocpnative client: error:", "refused")


def test_demo_checks_its_client_options_before_starting_the_server() -> None:
    proc = run("demo", "--count", "0")
    assert_one_line_error(proc, "count must be")
    assert proc.stdout == ""  # no "server listening" first


def test_demo_port_flag() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run("demo", "--port", str(port), "--count", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"server listening on 127.0.0.1:{port} " in proc.stdout, proc.stdout


def test_server_port_in_use(make_server) -> None:
    srv = make_server()
    proc = run("server", "--port", str(srv.port))
    assert_one_line_error(proc, "iocpnative server: error:", "in use")
    assert srv.running
    wait_until(lambda: srv.stats().active_connections == 0)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["server", "--port", "70000"], "port must be"),
        (["server", "--port", "-1"], "port must be"),
        (["server", "--workers", "0"], "workers must be"),
        (["server", "--buffer-size", "0"], "buffer_size must be"),
        (["server", "--max-connections", "0"], "max_connections must be"),
        (["server", "--idle-timeout", "0"], "idle_timeout must be"),
        (["server", "--idle-timeout", "nan"], "idle_timeout must be"),
        (["server", "--batch-wait-us", "-1"], "batch_wait_us must be"),
        (["bench", "--batch-wait-us", "1000001", "--duration", "1"], "batch_wait_us must be"),
        (["client", "--port", "70000", "--count", "1"], "port must be"),
        (["client", "--port", "6000", "--count", "0"], "count must be"),
        (["client", "--port", "6000", "--interval", "-1"], "interval must be"),
        (["client", "--port", "6000", "--interval", "inf"], "interval must be"),  # time.sleep
        (["client", "--port", "6000", "--interval", "nan"], "interval must be"),
        (["demo", "--interval", "inf"], "interval must be"),
        (["client", "--port", "6000", "--interval", "1e10"], "interval must be"),  # time.sleep
        (["demo", "--interval", "1e300"], "interval must be"),
        (["client", "--port", "6000", "--timeout", "0"], "timeout must be"),
        (["demo", "--workers", "0"], "workers must be"),
    ],
)
def test_bad_values_print_one_line(args: list[str], needle: str) -> None:
    proc = run(*args)
    assert_one_line_error(proc, needle)
    assert proc.returncode == 2


def test_unavailable_backend_is_one_line() -> None:
    unusable = [st.name for st in iocpnative.backend_statuses() if not st.available]
    assert unusable, "every platform lacks at least one backend"
    proc = run("server", "--port", "0", "--backend", unusable[0])
    assert_one_line_error(proc, unusable[0])


def test_argparse_errors_exit_2_without_traceback() -> None:
    for args in (["server", "--port", "abc"], ["nosuchcommand"], []):
        proc = run(*args)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert "usage:" in proc.stderr
