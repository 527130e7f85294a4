"""``python -m iocpnative bench``: the load generator from the command line.

A live progress line (only when stdout is a terminal), a final table, and with ``--json`` one
JSON object on the last line. Exit status: 0 clean, 1 when the run counted errors (or a system
error stopped it), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from ._bench import BenchResult, bench

_SERVER_OPTIONS = ("backend", "workers", "buffer_size", "max_connections", "batch_wait_us")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="load an echo server (ours by default) and report msgs/s and latency",
        description="Native ping-pong load generator; every echoed byte is verified. Without "
        "--host/--port it starts its own server on a free port (server options apply).",
    )
    p.add_argument("--host", default=None, help="server to load (default: start our own)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="bytes per message (default 512)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not counted (default 1)")
    p.add_argument(
        "--rate", type=float, default=None, help="fixed offered load, round trips/s in total"
    )
    p.add_argument("--threads", type=int, default=1, help="load threads (default 1)")
    p.add_argument("--pipeline", type=int, default=1, help="messages in flight per connection")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    g = p.add_argument_group("our own server (without --host/--port)")
    g.add_argument("--backend", default=None, choices=["auto", "iocp", "io_uring", "epoll"])
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--buffer-size", type=int, default=None)
    g.add_argument("--max-connections", type=int, default=None)
    g.add_argument("--batch-wait-us", type=int, default=None, help="see `server --help`")
    p.set_defaults(func=cmd_bench)


class _ProgressLine:
    """A ``\\r``-updated status line on a terminal; nothing when stdout is not one."""

    def __init__(self) -> None:
        self.enabled = sys.stdout.isatty()
        self.width = 0

    def __call__(self, p: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = (
            f"{p['phase']:<8} {p['elapsed_s']:5.1f}s  {p['recent_per_s']:>11,.0f} msgs/s  "
            f"open {p['open_connections']}  errors {p['errors']}"
        )
        self.width = max(self.width, len(line))
        sys.stdout.write("\r" + line.ljust(self.width))
        sys.stdout.flush()

    def clear(self) -> None:
        if self.enabled and self.width:
            sys.stdout.write("\r" + " " * self.width + "\r")
            sys.stdout.flush()


def _table(r: BenchResult) -> str:
    target = f"{r.host}:{r.port}"
    if r.backend is not None:
        target += f" (our server: backend {r.backend}, {r.workers} workers)"
    rows = [
        ("server", target),
        ("load", f"{r.connections} connections x {r.size} B, pipeline {r.pipeline}, "
                 f"{r.threads} thread(s), {r.warmup_s:g}s warm-up + {r.duration_s:.2f}s"
                 + (f", fixed rate {r.rate:g}/s" if r.rate else "")),
        ("round trips", f"{r.round_trips:,}"),
        ("msgs/s", f"{r.requests_per_s:,.0f}"),
        ("MB/s", f"{r.mb_per_s:,.2f} (payload one way)"),
        ("latency us", f"p50 {r.p50_us:,.0f}  p90 {r.p90_us:,.0f}  p99 {r.p99_us:,.0f}  "
                       f"p99.9 {r.p999_us:,.0f}  max {r.max_us:,.0f}"),
        ("client cpu", f"{r.client_cpu_pct:.0f}% of a core"),
        ("errors", str(r.errors) + ("" if not r.errors else "  " + ", ".join(
            f"{k} {v}" for k, v in r.error_kinds.items() if v))),
    ]  # fmt: skip
    if r.first_error:
        rows.append(("first error", r.first_error))
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def cmd_bench(args: argparse.Namespace) -> int:
    server_options = {k: getattr(args, k) for k in _SERVER_OPTIONS if getattr(args, k) is not None}
    line = _ProgressLine()
    try:
        r = bench(
            args.host,
            args.port,
            connections=args.connections,
            size=args.size,
            duration=args.duration,
            warmup=args.warmup,
            rate=args.rate,
            threads=args.threads,
            pipeline=args.pipeline,
            connect_timeout=args.connect_timeout,
            progress=line if line.enabled else None,
            **server_options,
        )
    finally:
        line.clear()
    print(_table(r), flush=True)
    if args.json:
        d = r.as_dict()
        d["ok"] = r.errors == 0
        print(json.dumps(d, sort_keys=True), flush=True)
    return 1 if r.errors else 0
