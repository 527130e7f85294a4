"""iocpnative: a completion-port TCP echo server and client with a native C++ core.

Windows uses an I/O completion port (IOCP); Linux uses io_uring, or epoll emulated into
completions where io_uring is unavailable. Python starts and stops the server and drives the
client; every byte is moved by native worker threads that never hold the GIL.
"""

from __future__ import annotations

from . import _native
from ._backends import BackendStatus, available_backends, backend_statuses
from ._bench import BenchResult, bench
from ._client import Client, run_client_loop
from ._crash import (
    crash_dump_directory,
    disable_crash_dumps,
    enable_crash_dumps,
    trigger_test_crash,
)
from ._server import ConnectCallback, DisconnectCallback, Handler, Reply, Server, ServerStats

__version__: str = _native.__version__

__all__ = [
    "BackendStatus",
    "BenchResult",
    "Client",
    "ConnectCallback",
    "DisconnectCallback",
    "Handler",
    "Reply",
    "Server",
    "ServerStats",
    "__version__",
    "available_backends",
    "backend_statuses",
    "bench",
    "crash_dump_directory",
    "disable_crash_dumps",
    "enable_crash_dumps",
    "run_client_loop",
    "trigger_test_crash",
]
