"""The Python logic of the handler benchmark, shared by every server that runs it.

``transform`` is what each server applies to every chunk it receives: one ``bytes.translate``
over the chunk with a 256-byte table. With ``UPPER`` that is an upper-casing server. echoload
(../shared/bench) checks that every byte comes back unchanged and sends random bytes (with no
option for other content), so the benchmark uses ``TABLE = IDENTITY``: the same work per byte
(a table lookup and a store into a fresh bytes object of the chunk's size), but the reply equals
the request and passes echoload's check. ``IOCPNATIVE_BENCH_TABLE=upper`` switches to real
upper-casing (then echoload reports corrupted echoes, by design).
"""

from __future__ import annotations

import os

IDENTITY = bytes(range(256))
UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
TABLE = UPPER if os.environ.get("IOCPNATIVE_BENCH_TABLE") == "upper" else IDENTITY


def transform(data: bytes) -> bytes:
    """The handler: fn(data) -> reply."""
    return data.translate(TABLE)
