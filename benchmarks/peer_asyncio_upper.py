#!/usr/bin/env python3
"""Benchmark peer: an asyncio Protocol that replies transform(data) (benchmarks/upper.py).

The same transform as ``python -m iocpnative server --handler upper:transform``, so that
../shared/bench/peers.py compares the servers running identical Python logic. Same structure
as the bench's peer_asyncio_protocol.py (TCP_NODELAY, pause reading while the transport's write
buffer is full). ``--loop uvloop`` runs it on uvloop (peer_uvloop_upper.py does that).
Prints "READY <port>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
import sys

from upper import transform


class TransformProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(transform(data))

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        TransformProtocol, host, port, backlog=backlog, reuse_address=True
    )
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(default_loop: str = "asyncio") -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default=default_loop)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    coro = serve(args.host, args.port, args.backlog)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
