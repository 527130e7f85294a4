# ruff: noqa: RUF001  (the tables use the multiplication sign on purpose)
"""Runs the side-by-side comparison of issue 7 and writes docs/benchmarks.md (``nox -s bench``).

Every figure comes from ../shared/bench/peers.py (echoload as the client, servers started fresh
and interleaved, server pinned to CPU 0, client to CPU 1) or from pyclient.py, and every table in
the Markdown file is generated from their JSON output here: nothing is typed by hand.

    python benchmarks/run.py [--quick] [--rounds N] [--duration S] [--peers-arg=--quiet-wait=10]
                             [--out docs/benchmarks.md] [--results DIR]
    python benchmarks/run.py --report-only --results DIR     # re-render from earlier JSON

The PNG (a plot next to --out) needs matplotlib; without it only the Markdown is written.
peers.py finds echoload and the peers' venv in $BENCH_HOME, by default build/shared-bench (where
`nox -s bench` has build.sh put them): outside nox run
`BENCH_HOME=build/shared-bench bash ../shared/bench/build.sh` first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from plot import write_png

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT.parent / "shared" / "bench"
PEERS = BENCH / "peers.py"
HERE = Path(__file__).resolve().parent
# Where build.sh puts bin/ and .venv/ and where peers.py looks for them ($BENCH_HOME), unless
# set: in our build/, never in ../shared (`nox -s bench` passes the same default).
BENCH_HOME = ROOT / "build" / "shared-bench"

# The issue's scenarios: (key, title, peers.py arguments).
FULL = {"rounds": 3, "duration": 5, "warmup": 1, "idle": 5000, "scale_rounds": 2}
QUICK = {"rounds": 1, "duration": 1, "warmup": 0.5, "idle": 1000, "scale_rounds": 1}
SCALING = (1, 10, 100, 1000, 10000)
IDLE_SMALL = 1000  # the full run measures idle memory at this count too


def iocpnative_servers(py: str) -> dict[str, str]:
    """Our server with the `auto` backend, and once more per other backend this machine has."""
    import iocpnative

    base = f"{shlex.quote(py)} -m iocpnative server --port {{port}} --workers 1"
    base += " --max-connections 20000"
    servers = {"iocpnative": base}
    auto = iocpnative._native.resolve_backend("auto")
    for b in iocpnative.available_backends():
        if b != auto:  # `iocpnative` already is the auto backend
            servers[f"iocpnative_{b}"] = f"env IOCPNATIVE_BACKEND={b} {base}"
    return servers


def run_peers(name: str, args: list[str], results: Path, servers: dict[str, str],
              extra: list[str]) -> Path:  # fmt: skip
    out = results / f"{name}.json"
    cmd = [sys.executable, str(PEERS), *args, *extra, "--json", str(out), "--logdir",
           str(results / "logs")]  # fmt: skip
    for n, c in servers.items():
        cmd += ["--server", f"{n}={c}"]
    print("\n$ " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if not out.exists():
        raise SystemExit(f"peers.py wrote no {out} (exit {rc})")
    d = json.loads(out.read_text())
    # Shown relative to the checkout, with the session's interpreter as plain `python`.
    shown = shlex.join(["python3", "peers.py", *cmd[2:]]).replace(sys.executable, "python")
    d["command"] = shown.replace(str(ROOT) + "/", "")
    d["exit_status"] = rc
    import iocpnative  # the default batch window the `iocpnative` rows ran with

    d["batch_wait_us_default"] = iocpnative._native.DEFAULT_BATCH_WAIT_US
    out.write_text(json.dumps(d, indent=1))
    return out


def run_all(
    quick: bool, results: Path, over: dict, extra: list[str], only: set[str] | None = None
) -> None:
    """Runs every scenario, or with `only` the named ones (result keys such as a_50x512; the
    others keep their earlier results in `results`)."""
    p = {**(QUICK if quick else FULL), **over}
    results.mkdir(parents=True, exist_ok=True)
    wake_cost(results, "start", quick)
    py = sys.executable
    ours = iocpnative_servers(py)
    common = ["--duration", str(p["duration"]), "--warmup", str(p["warmup"])]
    rounds = ["--rounds", str(p["rounds"])]
    scen = [
        ("a_50x512", ["--connections", "50", "--size", "512"]),
        ("b_rate30000_50x512", ["--connections", "50", "--size", "512", "--rate", "30000"]),
        ("c_1000x128", ["--connections", "1000", "--size", "128"]),
        ("d_rate20000_1000x128", ["--connections", "1000", "--size", "128", "--rate", "20000"]),
        ("e_10x65536", ["--connections", "10", "--size", "65536"]),
    ]
    # At a fixed rate also with the earlier default batch window (200 us) and without batched
    # waits, to show what the window costs in latency and saves in CPU.
    variants = {name: ours["iocpnative"] + f" --batch-wait-us {us}" for name, us in VARIANTS}
    for key, a in scen:
        servers = {**ours, **variants} if "--rate" in a else ours
        if only is None or key in only:
            run_peers(key, [*a, *common, *rounds], results, servers, extra)
    if only is None or "f_idle" in only:
        run_peers("f_idle", ["--rounds", "0", "--idle-connections", str(p["idle"])], results,
                  ours, extra)  # fmt: skip
        if not quick and p["idle"] != IDLE_SMALL:
            run_peers(f"f_idle{IDLE_SMALL}",
                      ["--rounds", "0", "--idle-connections", str(IDLE_SMALL)], results, ours,
                      extra)  # fmt: skip
    if only is not None:
        wake_cost(results, "end", quick)
        return
    only = ["--only", "c_epoll,iocpnative", "--rounds", str(p["scale_rounds"])]
    for n in SCALING:
        run_peers(f"s_{n}", ["--connections", str(n), "--size", "512", *common, *only], results,
                  {"iocpnative": ours["iocpnative"]}, extra)  # fmt: skip
    # Two workers, allowed on both cores: they share CPU 1 with the client.
    w2 = {"iocpnative_w2": ours["iocpnative"].replace("--workers 1", "--workers 2")}
    for n in SCALING:
        run_peers(f"w2_{n}", ["--connections", str(n), "--size", "512", *common,
                              "--only", "iocpnative_w2", "--server-cpu", "0,1",
                              "--rounds", str(p["scale_rounds"])], results, w2, extra)  # fmt: skip
    cmd = [py, str(HERE / "pyclient.py"), "--json", str(results / "pyclient.json")]
    if quick:
        cmd.append("--quick")
    print("\n$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wake_cost(results, "end", quick)


def wake_cost(results: Path, when: str, quick: bool) -> None:
    """benchmarks/wakecost.py on peers.py's server CPU (0), woken from the client's (1); kept
    in wakecost.json under `when` (start, end of the run)."""
    cmd = [sys.executable, str(HERE / "wakecost.py"), "--cpu", "0", "--other-cpu", "1"]
    if quick:
        cmd += ["--loops", "300"]
    print("\n$ " + shlex.join(cmd), flush=True)
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(r.stdout.strip(), flush=True)
    path = results / "wakecost.json"
    d = json.loads(path.read_text()) if path.exists() and when != "start" else {}
    d[when] = json.loads(r.stdout.strip().splitlines()[-1])
    d["command"] = shlex.join(["python", *cmd[1:]]).replace(str(ROOT) + "/", "")
    path.write_text(json.dumps(d, indent=1))


# --- rendering ----------------------------------------------------------------------------


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def paired(runs: list[dict], name: str, base: str, key: str) -> float | None:
    """Median over rounds of (name ÷ base in the same round)."""
    by_round = {r["round"]: r[key] for r in runs if r["server"] == base and r.get("ok")}
    mine = [r for r in runs if r["server"] == name and r.get("ok") and r.get(key) is not None]
    return _med([r[key] / by_round[r["round"]] for r in mine if by_round.get(r["round"])])


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def saturated_table(d: dict) -> tuple[str, dict]:
    s, runs = d["summary"], d["runs"]
    order = sorted(s, key=lambda n: -(s[n]["msgs_per_s_median"] or 0))
    rows, figs = [], {}
    for n in order:
        x = s[n]
        vs_c = paired(runs, n, "c_epoll", "msgs_per_s")
        vs_uv = paired(runs, n, "uvloop_protocol", "msgs_per_s")
        figs[n] = {"msgs": x["msgs_per_s_median"], "mb": x["mb_per_s_median"], "vs_c": vs_c,
                   "vs_uv": vs_uv, "p99": x["p99_us_median"]}  # fmt: skip
        bound = (x["client_cpu_pct_median"] or 0) >= 95
        rows.append([
            n, f"{x['runs_ok']}/{x['runs']}", _f(x["msgs_per_s_median"], ",.0f"),
            _f(x["mb_per_s_median"], ",.1f"), _f(x["p50_us_median"], ",.0f"),
            _f(x["p99_us_median"], ",.0f"), _f(x["server_cpu_pct_median"], ".0f") + "%",
            _f(x["client_cpu_pct_median"], ".0f") + "%" + (" (client-bound)" if bound else ""),
            _f(x["server_cpu_us_per_msg_median"], ".2f"), _f(vs_c, ".2f") + "×",
            _f(vs_uv, ".2f") + "×",
        ])  # fmt: skip
    hdr = ["server", "ok", "msgs/s", "MB/s", "p50 µs", "p99 µs", "srv cpu", "cli cpu",
           "srv µs/msg", "vs c_epoll (paired)", "vs uvloop (paired)"]  # fmt: skip
    return table(hdr, rows), figs


def rate_table(d: dict) -> tuple[str, dict]:
    s, runs = d["summary"], d["runs"]
    order = sorted(s, key=lambda n: s[n]["server_cpu_us_per_msg_median"] or 1e9)
    rows, figs = [], {}
    for n in order:
        x = s[n]
        vs_c = paired(runs, n, "c_epoll", "server_cpu_us_per_msg")
        vs_uv = paired(runs, n, "uvloop_protocol", "server_cpu_us_per_msg")
        figs[n] = {"us": x["server_cpu_us_per_msg_median"], "vs_c": vs_c, "vs_uv": vs_uv,
                   "p99": x["p99_us_median"]}  # fmt: skip
        sat = f" (SATURATED {x['saturated_runs']}/{x['runs_ok']})" if x["saturated_runs"] else ""
        rows.append([
            n, f"{x['runs_ok']}/{x['runs']}", _f(x["rate_achieved_median"], ",.0f") + sat,
            _f(x["server_cpu_us_per_msg_median"], ".2f"), _f(x["server_cpu_pct_median"], ".0f")
            + "%", _f(x["p50_us_median"], ",.0f"), _f(x["p99_us_median"], ",.0f"),
            _f(vs_c, ".2f") + "×", _f(vs_uv, ".2f") + "×",
        ])  # fmt: skip
    hdr = ["server", "ok", "achieved/s", "srv µs/msg", "srv cpu", "p50 µs", "p99 µs",
           "vs c_epoll (paired)", "vs uvloop (paired)"]  # fmt: skip
    return table(hdr, rows), figs


def idle_table(d: dict) -> tuple[str, dict]:
    recs = sorted(d["idle"], key=lambda r: r.get("kib_per_conn", 1e18))
    rows = [[r["server"], "yes" if r.get("ok") else "NO", str(r.get("base_rss_kib", "-")),
             str(r.get("peak_hwm_kib", "-")), _f(r.get("kib_per_conn"), ".2f")]
            for r in recs]  # fmt: skip
    figs = {r["server"]: r.get("kib_per_conn") for r in recs}
    return table(["server", "ok", "base RSS KiB", "peak HWM KiB", "KiB/conn"], rows), figs


def scaling_table(results: Path) -> str:
    rows = []
    for n in SCALING:
        row = [f"{n:,}"]
        for prefix, name in (("s", "c_epoll"), ("s", "iocpnative"), ("w2", "iocpnative_w2")):
            f = results / f"{prefix}_{n}.json"
            x = json.loads(f.read_text())["summary"].get(name) if f.exists() else None
            row += [_f(x and x["msgs_per_s_median"], ",.0f"), _f(x and x["p99_us_median"], ",.0f")]
        f = results / f"s_{n}.json"
        vs = paired(json.loads(f.read_text())["runs"], "iocpnative", "c_epoll", "msgs_per_s") \
            if f.exists() else None  # fmt: skip
        rows.append([*row, _f(vs, ".2f") + "×"])
    hdr = [
        "connections",
        "c_epoll msgs/s",
        "p99 µs",
        "iocpnative msgs/s",
        "p99 µs",
        "iocpnative --workers 2 msgs/s ⚠",
        "p99 µs",
        "iocpnative vs c_epoll (paired)",
    ]
    return table(hdr, rows)  # fmt: skip


def pyclient_table(d: dict) -> str:
    def cpu(c: dict, key: str, fmt: str, unit: str = "") -> str:
        return _f(c.get(key), fmt) + (unit if c.get(key) is not None else "")

    rows = [[f"{c['size']:,}", _f(c["client_median"], ",.0f"), _f(c["socket_median"], ",.0f"),
             _f(c["ratio_paired"], ".2f") + "×", cpu(c, "client_cpu_us", ".2f"),
             cpu(c, "socket_cpu_us", ".2f"), cpu(c, "cpu_ratio_paired", ".2f", "×")]
            for c in d["cases"]]  # fmt: skip
    hdr = ["size B", "Client.request req/s", "socket loop req/s", "Client ÷ socket",
           "Client CPU µs/req", "socket CPU µs/req", "CPU Client ÷ socket"]  # fmt: skip
    return table(hdr, rows)


def targets(f: dict, idle_n: int, idle_small: float | None = None) -> str:
    """The issue's target table, filled with the measured figures."""

    def row(scn, fig, tgt, val, ok):
        return [scn, fig, tgt, val, "-" if ok is None else ("met" if ok else "**not met**")]

    def at_least_one(scn, fig, x, key, peer):  # a saturated figure: at least the peer
        return row(scn, fig, f"≥ 1.0× {peer}" + (" (paired)" if key == "vs_c" else ""),
                   _f(x.get(key), ".2f") + "×", x.get(key) and x[key] >= 1.0)  # fmt: skip

    a, b, c, dd, e, idle = (f.get(k, {}) for k in ("a", "b", "c", "d", "e", "f"))
    me = "iocpnative"
    rows = []
    rows.append(
        at_least_one("50 conns × 512 B", "saturated msgs/s", a.get(me, {}), "vs_c", "c_epoll")
    )
    # The default, then the variants a run has (results from before a variant existed lack it).
    kinds = [(me, "")] + [(n, f", `--batch-wait-us {us}`") for n, us in VARIANTS]
    for name, label in kinds:
        x = b.get(name, {})
        if name != me and not x:
            continue
        ok = x.get("vs_uv") is not None and x["vs_uv"] <= 0.5 and (x.get("vs_c") or 9) <= 0.8
        rows.append(
            row(
                f"50 × 512 B at 30,000/s{label}",
                "server CPU µs/msg",
                "≤ 0.5× uvloop, ≤ 0.8× c_epoll",
                f"{_f(x.get('us'), '.2f')} µs = {_f(x.get('vs_uv'), '.2f')}× uvloop, "
                f"{_f(x.get('vs_c'), '.2f')}× c_epoll",
                ok if x else None,
            )
        )
    rows.append(
        at_least_one("1000 conns × 128 B", "saturated msgs/s", c.get(me, {}), "vs_c", "c_epoll")
    )
    ce = dd.get("c_epoll", {})
    for name, label in kinds:
        x = dd.get(name, {})
        if name != me and not x:
            continue
        ok = (x.get("vs_c") is not None and x["vs_c"] <= 0.8 and x.get("p99") is not None
              and ce.get("p99") is not None and x["p99"] <= ce["p99"])  # fmt: skip
        rows.append(
            row(
                f"1000 × 128 B at 20,000/s{label}",
                "server CPU µs/msg, p99",
                "≤ 0.8× c_epoll; p99 ≤ c_epoll's",
                f"{_f(x.get('vs_c'), '.2f')}× c_epoll; p99 {_f(x.get('p99'), ',.0f')} µs vs "
                f"{_f(ce.get('p99'), ',.0f')} µs",
                ok if x else None,
            )
        )
    rows.append(
        at_least_one("10 conns × 64 KiB", "saturated MB/s", e.get(me, {}), "vs_uv", "uvloop")
    )
    if idle_small is not None:
        v = idle_small
        rows.append(row(f"{IDLE_SMALL:,} idle connections", "user-space KiB per connection",
                        "≤ 0.5 KiB", _f(v, ".3f") + " KiB", v <= 0.5))  # fmt: skip
    v = idle.get(me)
    rows.append(row(f"{idle_n:,} idle connections", "user-space KiB per connection", "≤ 0.5 KiB",
                    _f(v, ".3f") + " KiB", None if v is None else v <= 0.5))  # fmt: skip
    return table(["scenario", "figure", "target", "measured (iocpnative, auto backend)", ""], rows)


STEAL_PCT = 10  # a run with more steal than this is reported as disturbed

# Fixed-rate variants of `iocpnative`: name, --batch-wait-us.
VARIANTS = (("iocpnative_w200", 200), ("iocpnative_nobatch", 0))


def batch_note(default_us: int, with_w200: bool) -> str:
    w200 = ("`iocpnative_w200` (`--batch-wait-us 200`, the earlier default) waits up to 200 µs; "
            if with_w200 else "")  # fmt: skip
    return (
        f"Batched waits trade latency for CPU: the default `iocpnative` row waits up to "
        f"{default_us} µs for a batch of io_uring completions (one per 4 receives posted, at most "
        f"16, or what the window brings) before answering them together; {w200}"
        "`iocpnative_nobatch` (`--batch-wait-us 0`) answers each completion at once."
    )


def wake_figures(results: Path) -> dict | None:
    """Medians over the start and end measurements of wakecost.json, if the run has one."""
    path = results / "wakecost.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    when = [k for k in ("start", "end") if k in d]
    parts = [d[k] for k in when]
    out = {k: _med([x for p in parts for x in p[f"{k}_us_runs"]]) for k in ("timer", "pipe",
           "syscall")}  # fmt: skip
    return {**out, "sleep_us": parts[0]["sleep_us"], "n": sum(p["repeats"] for p in parts),
            "when": " and the ".join(when), "command": d["command"]}  # fmt: skip


def wake_line(w: dict | None) -> str:
    if w is None:
        return ""
    return (
        f"- Wake-up cost, measured with no server (`{w['command']}`, at the {w['when']} of the "
        f"run, median of {w['n']}): a thread on CPU 0 that sleeps {w['sleep_us']} µs pays "
        f"{_f(w['timer'], '.1f')} µs of CPU per sleep and wake-up; woken from CPU 1 through a "
        f"pipe, {_f(w['pipe'], '.1f')} µs per round trip (its read and write included); a system "
        f"call that does not sleep costs {_f(w['syscall'], '.2f')} µs. Every server below pays "
        "the like for each of its sleeps, in the CPU time the tables show.\n"
    )


def floor_note(w: dict | None, sat: dict, rate: dict) -> str:
    """What half of uvloop's CPU per message asks of a batch wait, given this machine's
    wake-up cost: at least (no work per message) and at the saturated figure's work."""
    me, uv = sat["summary"].get("iocpnative", {}), rate["summary"].get("uvloop_protocol", {})
    s, u = me.get("server_cpu_us_per_msg_median"), uv.get("server_cpu_us_per_msg_median")
    if w is None or w["timer"] is None or s is None or u is None:
        return ""
    half, t = u / 2, w["timer"]
    at_s = (f"about {t / (half - s):.0f} if a message's own work is what it costs saturated"
            if half > s else "and none is enough if a message's own work is what it costs "
            "saturated")  # fmt: skip
    return (
        f"For scale: half of uvloop's figure is {half:.2f} µs per message. iocpnative saturated "
        f"spends {s:.2f} µs per message (50 × 512 B above, where its worker polls rather than "
        f"sleeps), and here a sleep and wake-up costs a thread {t:.1f} µs (Machine, "
        "above). A server that met the figure would share each wake-up among the requests it "
        f"answers: at least {t / half:.1f} requests per wake-up even if a message cost nothing "
        f"else, {at_s} ({s:.2f} µs)."
    )


def render(results: Path, out: Path, quick: bool, command: str, report_only: bool) -> None:
    docs = {k: json.loads((results / f"{k}.json").read_text()) for k in (
        "a_50x512", "b_rate30000_50x512", "c_1000x128", "d_rate20000_1000x128", "e_10x65536",
        "f_idle")}  # fmt: skip
    env = docs["a_50x512"]["environment"]
    import iocpnative

    figs: dict[str, dict] = {}
    parts = []
    wake = wake_figures(results)
    runs = [r for d in docs.values() for r in d["runs"]]
    busy = sum(1 for r in runs if (r.get("other_procs_cpu_pct") or 0) > 5)
    busy_note = (f"\n**Busy machine**: in {busy} of {len(runs)} runs other processes used more "
                 "than 5% of a core (peers.py's interference check); those figures are disturbed."
                 "\n" if busy else "")  # fmt: skip
    stolen = [r for r in runs if (r.get("steal_pct") or 0) > STEAL_PCT]
    if stolen:
        names = ", ".join(sorted({r["server"] for r in stolen}))
        busy_note += (
            f"\n**Stolen CPU**: in {len(stolen)} of {len(runs)} runs the hypervisor took more than "
            f"{STEAL_PCT}% of the machine's CPU time (steal, /proc/stat) from a virtual CPU that "
            f"wanted to run ({names}); the servers and the client of those runs had less CPU than "
            "the others, and a median over rounds or a paired ratio moves with them.\n"
        )
    sections = [
        ("a", "a_50x512", "Saturated: 50 connections × 512 B", saturated_table),
        ("b", "b_rate30000_50x512", "Fixed rate 30,000 round trips/s: 50 × 512 B (server CPU "
         "per message, lower is better)", rate_table),
        ("c", "c_1000x128", "Saturated: 1000 connections × 128 B", saturated_table),
        ("d", "d_rate20000_1000x128", "Fixed rate 20,000 round trips/s: 1000 × 128 B", rate_table),
        ("e", "e_10x65536", "Saturated: 10 connections × 64 KiB", saturated_table),
        ("f", "f_idle", f"Idle connections: {docs['f_idle']['config']['idle_connections']:,} "
         "held open, server memory", idle_table),
    ]  # fmt: skip
    small = f"f_idle{IDLE_SMALL}"
    if (results / f"{small}.json").exists():
        docs[small] = json.loads((results / f"{small}.json").read_text())
        sections.append(("g", small, f"Idle connections: {IDLE_SMALL:,} held open, server "
                         "memory", idle_table))  # fmt: skip
    for key, name, title, fn in sections:
        d = docs[name]
        text, figs[key] = fn(d)
        c = d["config"]
        load = "" if key in ("f", "g") else (
            f"{c['rounds']} interleaved round(s) of {c['warmup']:g} s warm-up + "
            f"{c['duration']:g} s. ")  # fmt: skip
        bad = "" if d.get("exit_status", 0) == 0 else " **peers.py reported failed runs.**"
        if "iocpnative_nobatch" in d["summary"]:
            # Results from before the default was recorded ran with 200 us.
            text += "\n\n" + batch_note(d.get("batch_wait_us_default", 200),
                                          "iocpnative_w200" in d["summary"])  # fmt: skip
        if key == "b" and (note := floor_note(wake, docs["a_50x512"], d)):
            text += "\n\n" + note
        parts.append(f"### {title}\n\n{load}Command: `{d['command']}`{bad}\n\n{text}\n")
    py = json.loads((results / "pyclient.json").read_text())
    w2_note = (
        "⚠ `--workers 2` runs unpinned (`--server-cpu 0,1`): its workers share CPU 1 with "
        "the client, so the figure is for completeness, not a fair comparison."
    )
    shown_results = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    backends = ", ".join(iocpnative.available_backends())
    auto = iocpnative._native.resolve_backend("auto")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if report_only:  # say when the figures were measured, not only when they were rendered
        date += f" from the results of a run started {env['date'].replace('T', ' ')}"
    png = out.with_suffix(".png")
    plot = (
        f"![Saturated msgs/s and fixed-rate server CPU µs/msg per server]({png.name})\n\n"
        "The plot shows the saturated scenarios' round trips/s (higher is better) and the "
        "fixed-rate scenarios' server CPU µs per round trip (lower is better) for every server, "
        "iocpnative in blue; the tables below have the exact figures.\n"
        if write_png(docs, png)
        else ""
    )
    md = f"""# Benchmarks

Generated by `{command}` on {date}; do not edit by hand (every table below is rendered from the
JSON that the run wrote to `{shown_results}`).
{"**Quick run** (`--quick`): one short round per scenario, indicative only." if quick else ""}
{busy_note}
- Machine: {env["cpu"]} × {env["ncpu"]} CPUs, Linux {env["kernel"]} ({platform.machine()})
- Versions: iocpnative {iocpnative.__version__} (backends here: {backends}),
  Python {env["python"]}, uvloop {env["uvloop"]}
- Method: `../shared/bench/peers.py` (see its README): every server started fresh, servers
  interleaved round by round, server pinned to CPU 0 and the load generator `echoload` to CPU 1;
  "paired" = median over rounds of the same-round ratio. On 2 CPUs the client saturates first:
  a "(client-bound)" msgs/s ranks the client, so compare such servers by server µs/msg.
- `iocpnative` is `python -m iocpnative server --workers 1` with the `auto` backend
  ({auto}); `iocpnative_<backend>` forces another one with `IOCPNATIVE_BACKEND`.
{wake_line(wake)}
## Targets of issue 7

{targets(figs, docs["f_idle"]["config"]["idle_connections"], figs.get("g", {}).get("iocpnative"))}

## Results

{plot}
{chr(10).join(parts)}
### Scaling: connections × 512 B, saturated

{w2_note}

{scaling_table(results)}

### Python client: `Client.request` in a loop vs a plain `socket` loop

Command: `{py["command"]}`. {py["method"]}

{pyclient_table(py)}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short round per scenario")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--results", default=str(ROOT / "build" / "bench-results"))
    ap.add_argument("--report-only", action="store_true", help="render earlier results only")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per scenario (full run: 3)")
    ap.add_argument("--duration", type=float, help="seconds measured per run (full run: 5)")
    ap.add_argument(
        "--only-scenarios",
        metavar="KEYS",
        help="comma list of the main scenarios to run again (a_50x512, b_rate30000_50x512, "
        "c_1000x128, d_rate20000_1000x128, e_10x65536, f_idle: both idle counts); the rest is "
        "rendered from --results",
    )
    ap.add_argument(
        "--peers-arg",
        action="append",
        default=[],
        help="passed on to every peers.py run, e.g. --peers-arg=--quiet-wait=10",
    )
    args = ap.parse_args()
    over = {k: v for k, v in (("rounds", args.rounds), ("duration", args.duration)) if v}
    if args.rounds:
        over["scale_rounds"] = min(args.rounds, FULL["scale_rounds"])
    results = Path(args.results).resolve()
    if not args.report_only:
        # Inherited by peers.py and through it by the peers (whose imported module lives in
        # ../shared/bench, so its bytecode would be written there).
        home = os.environ.setdefault("BENCH_HOME", str(BENCH_HOME))
        os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(home) / "pycache"))
        if not PEERS.exists():
            raise SystemExit(f"{PEERS} not found: ../shared/bench is needed")
        only = set(args.only_scenarios.split(",")) if args.only_scenarios else None
        run_all(args.quick, results, over, args.peers_arg, only)
    shown = sys.argv[1:]
    command = "nox -s bench" + (" -- " + shlex.join(shown) if shown else "")
    render(results, Path(args.out), args.quick, command, args.report_only)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
