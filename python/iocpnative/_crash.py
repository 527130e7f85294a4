"""Crash capture: a fatal native fault leaves one report file, then the process dies as before.

Linux: a handler for SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT, running on an alternate
signal stack, writes ``iocpnative-<pid>-<timestamp>.crash`` (signal, fault address, thread,
native backtrace, version) and passes the signal on: a handler installed before it (Python's
:mod:`faulthandler`, for example) still runs, and the process dies of the same signal, with a
core dump where one would have been written.

Windows: an unhandled-exception filter writes a minidump ``iocpnative-<pid>-<timestamp>.dmp``
(all threads) with ``MiniDumpWriteDump``; the process then dies with the same exception code.
"""

from __future__ import annotations

import os
from typing import NoReturn

from . import _native


def enable_crash_dumps(directory: str | os.PathLike[str]) -> str:
    """Write a report into ``directory`` when native code crashes in this process.

    The directory is created if missing (like ``mkdir -p``), and again at the crash if it has
    been removed since; a report that still cannot be written is announced by one line on
    stderr. Calling again re-targets the handler to the new directory. Returns the absolute
    path of the directory in use.

    Call it from the main thread: the handler needs an alternate stack on a thread to report a
    stack overflow there, and this call gives one to the calling thread (the server's worker
    threads get their own when they start).

    Raises:
        OSError: the directory cannot be created or written (``ENOTDIR``, ``EACCES``, ...).
        ValueError: ``directory`` is empty.
    """
    path = os.fspath(directory)
    if not isinstance(path, str):
        raise TypeError(f"directory must be str or os.PathLike[str], not {type(path).__name__}")
    if not path:
        raise ValueError("crash dump directory must not be empty")
    # Bytes as the OS spells the name: a str may carry surrogate escapes of undecodable bytes.
    _native.enable_crash_dumps(os.fsencode(path))
    return _native.crash_dump_directory()


def disable_crash_dumps() -> None:
    """Stop writing crash reports and put back the handlers that were there before."""
    _native.disable_crash_dumps()


def crash_dump_directory() -> str | None:
    """The directory crash reports go to, or None while crash dumps are disabled."""
    return _native.crash_dump_directory() or None


def trigger_test_crash() -> NoReturn:
    """Crash this process on purpose, to check a crash-dump set-up.

    Writes through a null pointer in native code: SIGSEGV on Linux, an access violation on
    Windows. The process dies; this function never returns.
    """
    _native.trigger_test_crash()
