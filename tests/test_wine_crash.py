"""Crash capture on Windows, checked under wine: the MinGW-built native server crashes on purpose
and must leave a minidump whose exception stream names the access violation.

Run by ``nox -s mingw``, which builds iocpnative-server.exe and points IOCPNATIVE_WINE_SERVER at
it. Skipped when that variable is unset (a plain ``pytest`` run has no Windows build).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.wine

SERVER = os.environ.get("IOCPNATIVE_WINE_SERVER", "")
DUMP_NAME = re.compile(r"^iocpnative-\d+-\d{8}T\d{6}Z\.dmp$")

# Minidump stream types (minidumpapiset.h) and the exception code of a null-pointer write.
THREAD_LIST_STREAM = 3
EXCEPTION_STREAM = 6
EXCEPTION_ACCESS_VIOLATION = 0xC0000005


def minidump_streams(data: bytes) -> dict[int, bytes]:
    """The streams of a minidump by type: MINIDUMP_HEADER, then a MINIDUMP_DIRECTORY array."""
    signature, _version, count, directory = struct.unpack_from("<4sIII", data, 0)
    assert signature == b"MDMP"
    streams = {}
    for i in range(count):
        kind, size, rva = struct.unpack_from("<III", data, directory + 12 * i)
        streams[kind] = data[rva : rva + size]
    return streams


def windows_path(path: Path) -> str:
    # Wine maps the Unix root to drive Z: in every prefix it creates.
    return "Z:" + str(path.resolve()).replace("/", "\\")


@pytest.fixture
def wine_server() -> str:
    if not SERVER:
        pytest.skip("IOCPNATIVE_WINE_SERVER is not set (nox -s mingw sets it to the MinGW build)")
    if shutil.which("wine") is None:
        pytest.skip("wine is not installed")
    return SERVER


# "nested": a missing directory the server creates. "deep": longer than MAX_PATH (260), which
# Windows refuses without the extended-length (\\?\) form unless long paths are enabled by
# policy and manifest; wine has no such limit, so here it checks that the \\?\ form works.
@pytest.mark.parametrize("depth", ["nested", "deep"])
def test_server_test_crash_writes_minidump(wine_server: str, tmp_path: Path, depth: str) -> None:
    dumps = tmp_path / "dumps" / "nested"
    if depth == "deep":
        dumps = dumps.joinpath(*(c * 100 for c in "abc"))
        assert len(windows_path(dumps)) > 300
    env = {
        **os.environ,
        "WINEDEBUG": "-all",
        # Without a debugger to start, wine ends the process the way Windows does after an
        # unhandled exception: with the exception code (truncated to 8 bits by the Unix exit
        # status). With winedbg enabled it would attach and exit 0.
        "WINEDLLOVERRIDES": "winedbg.exe=d",
    }
    run = subprocess.run(
        [
            "wine",
            wine_server,
            "--port",
            "0",
            "--crash-dump-dir",
            windows_path(dumps),
            "--test-crash",
        ],
        capture_output=True,
        timeout=180,
        env=env,
    )
    assert run.returncode != 0, run.stderr.decode(errors="replace")
    found = sorted(dumps.glob("*.dmp"))
    assert len(found) == 1, (found, run.stdout, run.stderr)
    assert DUMP_NAME.match(found[0].name), found[0].name
    data = found[0].read_bytes()
    assert data[:4] == b"MDMP"
    streams = minidump_streams(data)
    # MINIDUMP_EXCEPTION_STREAM: ThreadId, alignment, then MINIDUMP_EXCEPTION.ExceptionCode.
    thread_id, _align, code = struct.unpack_from("<III", streams[EXCEPTION_STREAM], 0)
    assert code == EXCEPTION_ACCESS_VIOLATION, hex(code)
    # MINIDUMP_THREAD_LIST: a count, then 48-byte MINIDUMP_THREADs that start with ThreadId.
    thread_list = streams[THREAD_LIST_STREAM]
    (count,) = struct.unpack_from("<I", thread_list, 0)
    ids = [struct.unpack_from("<I", thread_list, 4 + 48 * i)[0] for i in range(count)]
    assert thread_id in ids
    assert count >= 2  # all threads: the faulting one and at least the dump writer
