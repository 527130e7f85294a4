"""Argument checks shared by Server, Client and the CLI: ValueError before any socket exists."""

from __future__ import annotations

import math
import numbers

KNOWN_BACKENDS = ("auto", "iocp", "io_uring", "epoll")


def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, numbers.Integral):
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    return int(port)


# The core's limits (kMaxWorkers, the 64 MiB buffer) and the native type of max_connections.
MAX_WORKERS = 1024
MAX_BUFFER_SIZE = 64 << 20
MAX_CONNECTIONS = 2**63 - 1
MAX_BATCH_WAIT_US = 1_000_000  # ServerConfig's kMaxBatchWaitUs


def check_batch_wait_us(value: object) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 0 <= int(value) <= MAX_BATCH_WAIT_US
    ):
        raise ValueError(
            f"batch_wait_us must be an integer in 0..{MAX_BATCH_WAIT_US} (microseconds), "
            f"got {value!r}"
        )
    return int(value)


def check_positive_int(name: str, value: object, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        allowed = ">= 1" if maximum is None else f"in 1..{maximum}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    if maximum is not None and int(value) > maximum:
        raise ValueError(f"{name} must be an integer in 1..{maximum}, got {value!r}")
    return int(value)


def check_timeout(name: str, value: object, *, allow_none: bool) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number of seconds > 0, got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    v = float(value)
    if not v > 0 or math.isinf(v) or math.isnan(v):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return v


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_host(host: object) -> str:
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    if "\x00" in host:  # the native side would read the name up to it and ignore the rest
        raise ValueError(f"host must not contain a NUL character, got {host!r}")
    return host


def check_backend(backend: object) -> str:
    if backend not in KNOWN_BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(repr(b) for b in KNOWN_BACKENDS)}, got {backend!r}"
        )
    return str(backend)
