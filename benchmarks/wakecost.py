"""What one sleep and wake-up costs a thread in CPU time on this machine (docs/benchmarks.md).

A server at a fixed message rate sleeps between batches, and every wake-up is paid in its CPU
time. This measures that price with no server at all, on the CPU peers.py pins servers to:

- timer: a process on --cpu sleeps --sleep-us, --loops times; its user+system CPU per sleep;
- pipe: a process on --cpu blocks reading a pipe that a process on --other-cpu writes, then
  answers through a second pipe, --loops times; the first one's CPU per round trip (one wake-up
  by the other CPU, one read and one write);
- syscall: the same loop making a system call that does not sleep (getppid), for the loop's own
  cost (the figures above include it). Not `time.sleep(0)`: on Linux that sleeps too (for the
  timer slack, 50 us by default).

Each is the median of --repeats. Prints one JSON object.

    python benchmarks/wakecost.py [--cpu 0] [--other-cpu 1] [--sleep-us 500] [--loops 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def cpu_us() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1e6


def timer(seconds: float, loops: int) -> float:
    t0 = cpu_us()
    for _ in range(loops):
        time.sleep(seconds)
    return (cpu_us() - t0) / loops


def syscall(loops: int) -> float:
    t0 = cpu_us()
    for _ in range(loops):
        os.getppid()
    return (cpu_us() - t0) / loops


def pipe(cpu: int, other: int, loops: int) -> float:
    """CPU per round trip of the side on `cpu`, woken each time by the side on `other`."""
    my_r, other_w = os.pipe()  # (read end, write end): the other side writes, we read
    other_r, my_w = os.pipe()  # and back
    pid = os.fork()
    if pid == 0:  # the waker, on the other CPU: it starts each round trip
        try:
            os.sched_setaffinity(0, {other})
            for _ in range(loops):
                os.write(other_w, b"x")
                os.read(other_r, 1)
        finally:
            os._exit(0)
    try:
        t0 = cpu_us()
        for _ in range(loops):
            os.read(my_r, 1)
            os.write(my_w, b"x")
        spent = cpu_us() - t0
    finally:
        os.waitpid(pid, 0)
        for fd in (my_r, other_w, other_r, my_w):
            os.close(fd)
    return spent / loops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", type=int, default=0, help="the CPU measured (peers.py's server CPU)")
    ap.add_argument("--other-cpu", type=int, default=1, help="the waking CPU of the pipe test")
    ap.add_argument("--sleep-us", type=int, default=500, help="each timer sleep (default 500)")
    ap.add_argument("--loops", type=int, default=1000, help="sleeps or round trips per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.loops < 1 or args.repeats < 1 or args.sleep_us < 1:
        ap.error("--loops, --repeats and --sleep-us must be at least 1")
    cpus = os.sched_getaffinity(0)
    for c in (args.cpu, args.other_cpu):
        if c not in cpus:
            ap.error(f"CPU {c} is not available to this process (have {sorted(cpus)})")
    os.sched_setaffinity(0, {args.cpu})
    out: dict = {"cpu": args.cpu, "other_cpu": args.other_cpu, "sleep_us": args.sleep_us,
                 "loops": args.loops, "repeats": args.repeats}  # fmt: skip
    runs: dict[str, list[float]] = {"timer": [], "pipe": [], "syscall": []}
    for _ in range(args.repeats):
        runs["timer"].append(timer(args.sleep_us / 1e6, args.loops))
        runs["pipe"].append(pipe(args.cpu, args.other_cpu, args.loops))
        runs["syscall"].append(syscall(args.loops))
    for k, v in runs.items():
        out[f"{k}_us"] = round(statistics.median(v), 2)
        out[f"{k}_us_runs"] = [round(x, 2) for x in v]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
