"""Command line: ``python -m iocpnative {server,client,demo,info,bench}`` (or ``iocpnative``).

Errors print one line to stderr and exit non-zero; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from ._backends import backend_statuses
from ._bench_cli import add_bench_parser
from ._client import check_client_loop_args, run_client_loop
from ._crash import enable_crash_dumps
from ._server import (
    DEFAULT_BATCH_WAIT_US,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    Server,
    ServerStats,
)

EXIT_ERROR = 1
EXIT_USAGE = 2


def _print_stats(stats: ServerStats, file=None) -> None:
    out = file or sys.stdout
    print("final stats: " + " ".join(f"{k}={v}" for k, v in stats.as_dict().items()), file=out)


def _add_server_options(p: argparse.ArgumentParser, default_port: int = 6000) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=default_port,
        help=f"port (0 = any free port; default {default_port})",
    )
    p.add_argument("--workers", type=int, default=None, help="worker threads (default: CPUs)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "iocp", "io_uring", "epoll"],
        help="I/O backend (default auto)",
    )
    p.add_argument("--buffer-size", type=int, default=DEFAULT_BUFFER_SIZE)
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    p.add_argument(
        "--idle-timeout", type=float, default=None, help="close connections idle this many seconds"
    )
    p.add_argument(
        "--batch-wait-us",
        type=int,
        default=DEFAULT_BATCH_WAIT_US,
        help="io_uring and epoll: wait up to this long for a batch of completions"
        f" (0 = answer each at once; default {DEFAULT_BATCH_WAIT_US})",
    )


def _load_callable(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function (ValueError if it cannot be found)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--handler must be module:function, got {spec!r}")
    # The console script's sys.path[0] is its bin/ folder, not the current directory that
    # `python -m iocpnative` puts there: look in the current directory the same way.
    # Not in safe-path mode (python -P, PYTHONSAFEPATH), which asks for exactly that not to happen.
    safe = getattr(sys.flags, "safe_path", False)
    if not safe and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--handler {spec}: {e}") from e
    except (Exception, SystemExit) as e:  # the module failed while being imported
        raise ValueError(f"--handler {spec}: importing it raised {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ValueError(f"--handler {spec} is not callable")
    return obj


def _make_server(args: argparse.Namespace, port: int | None = None) -> Server:
    spec = getattr(args, "handler", None)
    return Server(
        args.host,
        args.port if port is None else port,
        workers=args.workers,
        backend=args.backend,
        buffer_size=args.buffer_size,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        batch_wait_us=args.batch_wait_us,
        verbose=getattr(args, "verbose", False),
        handler=_load_callable(spec) if spec else None,
    )


# The server command stops in steps of this long, so that Ctrl-C is heard between them.
CLI_STOP_STEP_S = 1.0


def _abandon(srv: Server) -> NoReturn:
    print("iocpnative server: abandoned with a handler still running", file=sys.stderr)
    _print_stats(srv.stats(), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Python would wait for the handler at exit (it runs on a native worker thread).
    os._exit(EXIT_ERROR)


def cmd_server(args: argparse.Namespace) -> int:
    if args.crash_dump_dir is not None:
        where = enable_crash_dumps(args.crash_dump_dir)
        print(f"crash dumps go to {where}", flush=True)
    srv = _make_server(args)

    def announce() -> None:
        print(
            f"iocpnative {__version__} listening on {srv.host}:{srv.port} "
            f"(backend {srv.backend}, {srv.workers} workers); Ctrl-C to stop",
            flush=True,
        )

    # Announced only once SIGINT/SIGTERM are handled, so a signal right after it stops cleanly.
    try:
        srv.serve_forever(ready=announce, stop_timeout=CLI_STOP_STEP_S)
    except TimeoutError:
        # Workers still busy after the first second: a handler that has not returned (or, rarely,
        # connections still closing). Wait for them, unless told not to.
        print(
            "iocpnative server: still stopping: waiting for a handler to return "
            "(Ctrl-C again to abandon it)",
            file=sys.stderr,
            flush=True,
        )
        try:
            while True:
                try:
                    srv.stop(timeout=CLI_STOP_STEP_S)
                    break
                except TimeoutError:
                    continue
        except KeyboardInterrupt:
            _abandon(srv)
    except KeyboardInterrupt:
        # A second Ctrl-C while serve_forever() was stopping: done if the stop finished by then.
        try:
            srv.stop(timeout=0.001)
        except TimeoutError:
            _abandon(srv)
        _print_stats(srv.stats())
        return 130
    _print_stats(srv.stats())
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    check_client_loop_args(args.interval, args.count)
    n = run_client_loop(
        args.host, args.port, interval=args.interval, count=args.count, timeout=args.timeout
    )
    print(f"{n} replies received", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_client_loop_args(args.interval, args.count)  # before the server starts
    with _make_server(args) as srv:
        print(f"server listening on {srv.host}:{srv.port} (backend {srv.backend})", flush=True)
        n = run_client_loop(srv.host, srv.port, interval=args.interval, count=args.count)
        print(f"client received {n} of {args.count} replies", flush=True)
    _print_stats(srv.stats())
    st = srv.stats()
    if n != args.count or st.pool_in_use or st.pool_allocated:
        print("demo: FAILED", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(f"iocpnative {__version__}")
    print(
        f"python {platform.python_version()} on {platform.system()} {platform.release()} "
        f"({platform.machine()})"
    )
    print("backends (best first):")
    for st in backend_statuses():
        state = "available" if st.available else f"unavailable: {st.reason}"
        print(f"  {st.name:9s} {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iocpnative", description="Completion-port TCP echo server and client."
    )
    parser.add_argument("--version", action="version", version=f"iocpnative {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("server", help="run the echo server until Ctrl-C/SIGTERM")
    _add_server_options(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log connects and disconnects")
    p.add_argument(
        "--crash-dump-dir",
        metavar="DIR",
        default=None,
        help="on a native crash, write a report (Linux .crash, Windows .dmp) into DIR",
    )
    p.add_argument(
        "--handler",
        metavar="MODULE:FUNCTION",
        help="reply with FUNCTION(data) (a Python handler) instead of echoing",
    )
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("client", help="the seed's client: send No:1, No:2, ... and print replies")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6000)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between messages")
    p.add_argument("--count", type=int, default=None, help="messages to send (default: forever)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("demo", help="server + client loop + stats, in one command")
    _add_server_options(p, default_port=0)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.2)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="version, platform and backends")
    p.set_defaults(func=cmd_info)

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # TimeoutError and ConnectionError are OSErrors.
        print(f"iocpnative {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_ERROR
