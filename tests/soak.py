"""Soak: mixed traffic against the echo server for N minutes per backend (``nox -s soak``).

    python tests/soak.py --minutes 2 [--backend all|epoll|io_uring|...] [--clients 24]

The server runs in a child process (this script with ``--serve``) so that its resident memory
is measured alone. Client threads here mix four kinds of traffic: long-lived connections with
random payload sizes, short-lived connections, half-closes (send, ``shutdown(SHUT_WR)``, read
the echo to EOF) and resets (``SO_LINGER`` 0 with data in flight). Every echoed byte is
compared with what was sent.

Checked, and the exit status is non-zero when any fails:
- no echo mismatch and no unexpected error;
- pool counters consistent at every sample: ``pool_in_use`` never above the connections the
  driver can have open, ``pool_allocated - pool_in_use`` (the cache) within the pool's bound;
  after stop, ``pool_in_use == pool_allocated == active_connections == 0``;
- the server's RSS flat after warm-up: growth within the threshold below.

RSS threshold: each pool caches at most 256 free IoData blocks (csrc/core/io_data.hpp), so a
cache that reaches its bound only during the measured window may add up to
``pools * 256 * (buffer_size + 64)`` bytes without any leak; 2 MiB more covers the C
allocator's per-thread arenas and fragmentation. A leak of even one Connection per 1000
connections (this driver makes thousands a minute), or of one IoData per 1000 echoes, exceeds
it within minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import iocpnative
from iocpnative import Client, Server

HOST = "127.0.0.1"
BUFFER_SIZE = 16384
POOL_CACHE_BLOCKS = 256  # IoDataPool's default max_cached
IODATA_HEADER = 64  # bytes before the buffer in one IoData block (rounded up)
SAMPLE_S = 2.0


# --- the server child -------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def serve(backend: str, workers: int) -> int:
    srv = Server(HOST, 0, backend=backend, workers=workers, buffer_size=BUFFER_SIZE).start()
    print(json.dumps({"port": srv.port, "backend": srv.backend}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stop":
            srv.stop(10.0)
        print(json.dumps(srv.stats().as_dict()), flush=True)
        if cmd == "stop":
            return 0
    srv.stop(10.0)
    return 0


# --- the driver -------------------------------------------------------------------------------


@dataclass
class Tally:
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes_echoed: int = 0
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, nbytes: int) -> None:
        with self.lock:
            self.ops[kind] += 1
            self.bytes_echoed += nbytes


KINDS = ("persistent", "short", "half_close", "reset")


def payload_size(rng: random.Random) -> int:
    # Log-uniform from 1 byte to 256 KiB: many small messages, some spanning many buffers.
    return int(2 ** rng.uniform(0, 18))


def read_to_eof(s: socket.socket) -> bytes:
    parts = []
    while chunk := s.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def drive(port: int, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    persistent: Client | None = None
    try:
        while time.monotonic() < deadline:
            kind = rng.choices(KINDS, weights=(6, 2, 1, 1))[0]
            data = rng.randbytes(payload_size(rng))
            if kind == "persistent":
                if persistent is None:
                    persistent = Client(HOST, port, timeout=30.0)
                if persistent.request(data) != data:
                    tally.mismatches += 1
            elif kind == "short":
                with Client(HOST, port, timeout=30.0) as cli:
                    if cli.request(data) != data:
                        tally.mismatches += 1
            elif kind == "half_close":
                with socket.create_connection((HOST, port), timeout=30.0) as s:
                    sender = threading.Thread(target=lambda s=s, d=data: send_and_shut(s, d))
                    sender.start()
                    echoed = read_to_eof(s)
                    sender.join()
                    if echoed != data:
                        tally.mismatches += 1
            else:
                s = socket.create_connection((HOST, port), timeout=30.0)
                s.sendall(data[:65536])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                data = b""
            tally.add(kind, len(data))
    except Exception as e:
        with tally.lock:
            tally.errors.append(f"{type(e).__name__}: {e}")
    finally:
        if persistent is not None:
            persistent.close()


def send_and_shut(s: socket.socket, data: bytes) -> None:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)


class ServerChild:
    def __init__(self, backend: str, workers: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--backend", backend, "--workers", str(workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = json.loads(self._line())
        self.port: int = hello["port"]
        self.backend: str = hello["backend"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server child exited (status {self.proc.wait()})")
        return line

    def ask(self, cmd: str) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


def soak_one(backend: str, minutes: float, clients: int, workers: int, seed: int) -> bool:
    seconds = minutes * 60.0
    warmup = max(10.0, seconds / 4)
    child = ServerChild(backend, workers)
    tally = Tally()
    start = time.monotonic()
    deadline = start + seconds
    threads = [
        threading.Thread(target=drive, args=(child.port, seed + i, deadline, tally))
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    problems: list[str] = []
    # Pools: one per worker (epoll, io_uring) or one shared (IOCP); `workers` bounds both.
    cache_bound = workers * POOL_CACHE_BLOCKS
    max_conns = 2 * clients  # a driver thread has at most two connections open at once
    rss_base = rss_max = rss_last = 0
    max_in_use = 0
    while time.monotonic() < deadline:
        time.sleep(min(SAMPLE_S, max(0.0, deadline - time.monotonic())))
        s = child.ask("stats")
        rss_last = child.rss_kib()
        max_in_use = max(max_in_use, s["pool_in_use"])
        if not 0 <= s["pool_in_use"] <= min(s["pool_allocated"], max_conns):
            problems.append(f"pool_in_use out of bounds: {s}")
        if s["pool_allocated"] - s["pool_in_use"] > cache_bound:
            problems.append(f"pool cache above its bound {cache_bound}: {s}")
        elapsed = time.monotonic() - start
        if elapsed < warmup:
            continue
        if rss_base == 0:
            rss_base = rss_last
        rss_max = max(rss_max, rss_last)
    for t in threads:
        t.join(60.0)
    if any(t.is_alive() for t in threads):
        problems.append("driver threads hung")
    final = child.ask("stop")
    child.proc.wait(30)
    if child.proc.returncode != 0:
        problems.append(f"server child exited with {child.proc.returncode}")
    if (final["pool_in_use"], final["pool_allocated"], final["active_connections"]) != (0, 0, 0):
        problems.append(f"not freed after stop: {final}")
    if tally.mismatches:
        problems.append(f"{tally.mismatches} echo mismatches")
    problems += [f"driver error: {e}" for e in tally.errors]

    threshold_kib = (cache_bound * (BUFFER_SIZE + IODATA_HEADER)) // 1024 + 2048
    growth_kib = rss_last - rss_base if rss_base else 0
    if not rss_base:
        problems.append("no RSS sample after warm-up (run longer)")
    elif growth_kib > threshold_kib:
        problems.append(f"RSS grew {growth_kib} KiB after warm-up (threshold {threshold_kib})")
    pct = 100.0 * growth_kib / rss_base if rss_base else 0.0
    conns = sum(tally.ops[k] for k in ("short", "half_close", "reset")) + clients
    print(
        f"soak {child.backend}: {seconds:.0f} s, {clients} client threads, {workers} workers\n"
        f"  ops {tally.ops}, ~{conns} connections, {tally.bytes_echoed / 2**20:.1f} MiB echoed"
        f" byte-for-byte, {tally.mismatches} mismatches, {len(tally.errors)} errors\n"
        f"  server RSS after {warmup:.0f} s warm-up {rss_base} KiB, end {rss_last} KiB, "
        f"max {rss_max} KiB: growth {growth_kib:+d} KiB ({pct:+.2f} %), "
        f"threshold {threshold_kib} KiB\n"
        f"  pool_in_use max {max_in_use} (bound {max_conns}); after stop {final}\n"
        f"  {'FAIL' if problems else 'OK'}",
        flush=True,
    )
    for p in problems[:20]:
        print(f"  problem: {p}", flush=True)
    return not problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="per backend (default 1)")
    ap.add_argument("--backend", default="all", help="a backend name, or all (default)")
    ap.add_argument("--clients", type=int, default=24, help="client threads (default 24)")
    ap.add_argument("--workers", type=int, default=2, help="server worker threads (default 2)")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.backend, args.workers)
    if args.minutes <= 0:
        ap.error("--minutes must be > 0")
    backends = iocpnative.available_backends() if args.backend == "all" else [args.backend]
    print(f"soak: backends {backends}, {args.minutes} min each, seed {args.seed}", flush=True)
    ok = all([soak_one(b, args.minutes, args.clients, args.workers, args.seed) for b in backends])
    print(f"soak: {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
