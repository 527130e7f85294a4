"""``iocpnative.bench()``: the native load generator against any echo server, or our own."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _native
from ._server import Server
from ._validate import check_host, check_port, check_positive_int

ProgressFn = Callable[[Mapping[str, Any]], object]


@dataclass(frozen=True)
class BenchResult:
    """What one load run measured.

    ``requests_per_s`` counts round trips completed in the measured window (after the warm-up),
    all connections together; ``mb_per_s`` is payload one way (10^6 B/s). Latencies are round
    trips in microseconds, from the send (or, with ``rate``, from the scheduled send) to the last
    echoed byte: bucket upper edges of a log-linear histogram (< 0.8 % error). ``errors`` is the
    sum of ``error_kinds`` (connect_failed, reset, unexpected_eof, corrupt, excess, stalled,
    other); a corrupt echo counts once per message. ``backend``/``workers`` describe the server
    when ``bench()`` started its own, else they are ``None``.
    """

    requests_per_s: float
    mb_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    errors: int
    error_kinds: dict[str, int]
    first_error: str
    round_trips: int
    connections: int
    connections_open: int
    size: int
    duration_s: float
    warmup_s: float
    rate: float | None
    threads: int
    pipeline: int
    client_cpu_pct: float
    host: str
    port: int
    backend: str | None = None
    workers: int | None = None
    server_stats: dict[str, int] | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The native load generator's limits (loadgen.hpp): times become int64 nanoseconds.
MAX_SECONDS = 1e6
MAX_RATE = 1e9
# And its counts (loadgen.cpp's validate()); checked here so that a value too big for the native
# int is a ValueError too, not a TypeError from the binding.
MAX_CONNECTIONS = 1_000_000
MAX_SIZE = 64 << 20
MAX_THREADS = 256
MAX_PIPELINE = 1024


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan  # type: ignore[arg-type]
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) or v > MAX_SECONDS:
        low = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be a number of seconds {low} and <= {MAX_SECONDS:.0f}, got {value!r}"
        )
    return v


def _check_rate(rate: object) -> float | None:
    if rate is None:
        return None
    ok = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
    v = float(rate) if ok else math.nan  # type: ignore[arg-type]
    if not math.isfinite(v) or v <= 0 or v > MAX_RATE:
        raise ValueError(
            f"rate must be a number of round trips/s > 0 and <= {MAX_RATE:.0e}, got {rate!r}"
        )
    return v


def _check_descriptors(connections: int) -> None:
    """Our own server lives in this process: both ends of every connection need a descriptor."""
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        return
    need = 2 * connections + 64
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ValueError(
            f"{connections} connections to our own server need about {need} file descriptors in "
            f"this process, but RLIMIT_NOFILE allows {hard}: use fewer connections, or run the "
            "server in another process and pass host/port"
        )


def bench(
    host: str | None = None,
    port: int | None = None,
    *,
    connections: int = 50,
    size: int = 512,
    duration: float = 5.0,
    warmup: float = 1.0,
    rate: float | None = None,
    threads: int = 1,
    pipeline: int = 1,
    connect_timeout: float = 10.0,
    stall_timeout: float = 5.0,
    progress: ProgressFn | None = None,
    **server_options: Any,
) -> BenchResult:
    """Load an echo server with ``connections`` native ping-pong connections and measure it.

    With ``host``/``port`` it loads any echo server. Without them it starts its own
    ``Server(port=0, **server_options)`` (e.g. ``backend="epoll"``, ``workers=1``), loads it, stops
    it, and checks that every IoData went back to its pool (``RuntimeError`` if not).

    Every echoed byte is checked. ``rate`` fixes the offered load (round trips/s over all
    connections; latency then counts from the scheduled send time). ``progress``, if given, is
    called about once per second with a dict (phase, elapsed_s, round_trips, recent_per_s,
    errors, open_connections). The run takes at most ``connect_timeout + warmup + duration``
    seconds and stops by itself. Errors are counted in the result, not raised; bad arguments
    raise ``ValueError``.
    """
    connections = check_positive_int("connections", connections, MAX_CONNECTIONS)
    size = check_positive_int("size", size, MAX_SIZE)
    threads = check_positive_int("threads", threads, MAX_THREADS)
    pipeline = check_positive_int("pipeline", pipeline, MAX_PIPELINE)
    duration = _check_seconds("duration", duration, allow_zero=False)
    warmup = _check_seconds("warmup", warmup, allow_zero=True)
    connect_timeout = _check_seconds("connect_timeout", connect_timeout, allow_zero=False)
    stall_timeout = _check_seconds("stall_timeout", stall_timeout, allow_zero=False)
    rate = _check_rate(rate)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable or None, got {progress!r}")
    if (host is None) != (port is None):
        raise ValueError("give both host and port (an external server), or neither (our own)")
    own: Server | None = None
    if host is None:
        if "port" in server_options or "host" in server_options:
            raise ValueError("server options must not include host/port")
        _check_descriptors(connections)
        own = Server("127.0.0.1", 0, **server_options).start()
        host, port = own.host, own.port
    elif server_options:
        raise ValueError(
            f"server options ({', '.join(sorted(server_options))}) need our own server: "
            "leave out host and port"
        )
    host = check_host(host)
    port = check_port(port)
    if port == 0:
        raise ValueError("port must be in 1..65535 for an external server, got 0")

    stats: dict[str, int] | None = None
    try:
        raw = _native.run_load(
            host, port, connections, size, duration, warmup, rate or 0.0, threads, pipeline,
            connect_timeout, stall_timeout, progress,
        )  # fmt: skip
    finally:
        if own is not None:
            own.stop()
            stats = own.stats().as_dict()
    if own is not None and stats is not None and stats["pool_in_use"] != 0:
        raise RuntimeError(f"server leaked IoData after stop: pool_in_use={stats['pool_in_use']}")
    window = float(raw["window_s"])
    return BenchResult(
        requests_per_s=float(raw["requests_per_s"]),
        mb_per_s=float(raw["mb_per_s"]),
        p50_us=float(raw["p50_us"]),
        p90_us=float(raw["p90_us"]),
        p99_us=float(raw["p99_us"]),
        p999_us=float(raw["p999_us"]),
        max_us=float(raw["max_us"]),
        mean_us=float(raw["mean_us"]),
        errors=int(raw["errors"]),
        error_kinds={k: int(v) for k, v in raw["error_kinds"].items()},
        first_error=str(raw["first_error"]),
        round_trips=int(raw["round_trips"]),
        connections=connections,
        connections_open=int(raw["connections_open"]),
        size=size,
        duration_s=window,
        warmup_s=warmup,
        rate=rate,
        threads=threads,
        pipeline=pipeline,
        client_cpu_pct=100.0 * float(raw["client_cpu_s"]) / window if window > 0 else 0.0,
        host=host,
        port=port,
        backend=own.backend if own is not None else None,
        workers=own.workers if own is not None else None,
        server_stats=stats,
    )
