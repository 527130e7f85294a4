"""Python client side: ``iocpnative.Client.request`` in a loop vs a plain ``socket`` loop.

Both loops send one message, read back exactly its length, compare it with what was sent, and
repeat for a fixed time, against the same iocpnative server (``--workers 1``, pinned to CPU 0;
this process is pinned to CPU 1 when the machine has two). The two loops alternate within each
round, and the ratio is taken per round (paired), then the median over rounds. Besides requests
per second (bound by the round trip, which both loops share) it reports this process's CPU time
per request (``time.process_time``), the part the client itself costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time

import iocpnative


def shown_arg(a: str) -> str:
    """An argument as the report shows it: paths relative to the checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.relpath(a, root) if os.path.isabs(a) and a.startswith(root) else a


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server did not listen on {port}")


def client_loop(port: int, data: bytes, seconds: float) -> tuple[float, float]:
    """Requests per second and CPU microseconds per request."""
    n = 0
    with iocpnative.Client("127.0.0.1", port, timeout=5) as c:
        cpu0 = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if c.request(data) != data:
                raise SystemExit("Client.request: wrong echo")
            n += 1
        cpu = time.process_time() - cpu0
    return n / seconds, cpu / n * 1e6


def socket_loop(port: int, data: bytes, seconds: float) -> tuple[float, float]:
    """The same with a plain blocking socket (timeout 5 s, as the client's)."""
    n = 0
    size = len(data)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cpu0 = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s.sendall(data)
            got = bytearray()
            while len(got) < size:
                chunk = s.recv(size - len(got))
                if not chunk:
                    raise SystemExit("socket loop: connection closed")
                got += chunk
            if got != data:
                raise SystemExit("socket loop: wrong echo")
            n += 1
        cpu = time.process_time() - cpu0
    return n / seconds, cpu / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rounds, seconds = (2, 0.5) if args.quick else (5, 2.0)
    sizes = (64, 512, 16384)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    two = (os.cpu_count() or 1) >= 2
    server_cmd = [sys.executable, "-m", "iocpnative", "server", "--port", str(port)]
    server_cmd += ["--workers", "1"]
    pin = ["taskset", "-c", "0"] if two else []
    srv = subprocess.Popen(pin + server_cmd, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        if two:
            os.sched_setaffinity(0, {1})
        cases = []
        for size in sizes:
            data = os.urandom(size)
            cl, so, ratios, cl_cpu, so_cpu, cpu_ratios = [], [], [], [], [], []
            for r in range(rounds):
                # Alternate which loop goes first, so a drift does not favour one.
                if r % 2 == 0:
                    a, a_cpu = client_loop(port, data, seconds)
                    b, b_cpu = socket_loop(port, data, seconds)
                else:
                    b, b_cpu = socket_loop(port, data, seconds)
                    a, a_cpu = client_loop(port, data, seconds)
                cl.append(a)
                so.append(b)
                ratios.append(a / b)
                cl_cpu.append(a_cpu)
                so_cpu.append(b_cpu)
                cpu_ratios.append(a_cpu / b_cpu)
                print(f"size {size:>6}: Client.request {a:>9,.0f}/s {a_cpu:6.2f} us CPU  "
                      f"socket {b:>9,.0f}/s {b_cpu:6.2f} us CPU  ratio {a / b:.2f}",
                      flush=True)  # fmt: skip
            cases.append({
                "size": size, "client_rounds": cl, "socket_rounds": so,
                "client_median": statistics.median(cl), "socket_median": statistics.median(so),
                "ratio_paired": statistics.median(ratios),
                "client_cpu_us_rounds": cl_cpu, "socket_cpu_us_rounds": so_cpu,
                "client_cpu_us": statistics.median(cl_cpu),
                "socket_cpu_us": statistics.median(so_cpu),
                "cpu_ratio_paired": statistics.median(cpu_ratios),
            })  # fmt: skip
    finally:
        srv.terminate()
        srv.wait(10)
    shown = shlex.join([*pin, "python", *server_cmd[1:4], "--port", "P", "--workers", "1"])
    out = {
        "command": shlex.join(["python", "benchmarks/pyclient.py", *map(shown_arg, sys.argv[1:])]),
        "method": f"{rounds} rounds of {seconds:g} s per loop and size, the loops alternating; "
        f"server `{shown}`" + ("; client pinned to CPU 1" if two else "") + ". CPU = the "
        "client process's CPU time per request (time.process_time), medians and paired ratios "
        "over the rounds; req/s is bound by the round trip, which both loops share.",
        "cases": cases,
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
