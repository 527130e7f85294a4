"""Which I/O backends this machine can use."""

from __future__ import annotations

from dataclasses import dataclass

from . import _native


@dataclass(frozen=True)
class BackendStatus:
    """One backend: whether it is built in, usable here and now, and if not, why."""

    name: str
    compiled: bool
    available: bool
    reason: str


def available_backends() -> list[str]:
    """Backends usable here and now, best first (``"auto"`` picks the first).

    io_uring is probed at run time: a kernel or container (seccomp) that refuses it leaves it
    out of this list, and ``"auto"`` falls back to epoll.
    """
    return list(_native.available_backends())


def backend_statuses() -> list[BackendStatus]:
    """Every backend this platform knows, with whether and why it is (un)available."""
    return [BackendStatus(**d) for d in _native.backend_statuses()]
