"""Our load generator vs ../shared/bench's echoload, side by side, against peer_c_epoll.

    python benchmarks/loadgen_vs_echoload.py CONNECTIONS SIZE DURATION ROUNDS

Server pinned to CPU 0, client to CPU 1, a fresh server per run, the two clients alternating
(the order flips every round). Prints msgs/s and the client's CPU per message for each run and
the medians. Uses the installed iocpnative (run `nox -s bench` or
`BENCH_HOME=build/shared-bench bash ../shared/bench/build.sh` first).
"""

import json
import os
import statistics
import subprocess
import sys

# Where `nox -s bench` has ../shared/bench/build.sh put its tools (see benchmarks/run.py).
HOME = os.environ.get("BENCH_HOME") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "build", "shared-bench"
)
B = os.path.join(HOME, "bin")
C, S, D, R = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
env = dict(os.environ)
res = {"echoload": [], "iocpnative": []}
for rnd in range(R):
    for tool in ("echoload", "iocpnative") if rnd % 2 == 0 else ("iocpnative", "echoload"):
        srv = subprocess.Popen(
            ["taskset", "-c", "0", f"{B}/peer_c_epoll", "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = int(srv.stdout.readline().split()[1])
        # Both clients take the same flags; only the program differs.
        args = ["--port", str(port), "--connections", str(C), "--size", str(S),
                "--duration", D, "--warmup", "1", "--json"]  # fmt: skip
        if tool == "echoload":
            program = [f"{B}/echoload"]
        else:
            program = [sys.executable, "-m", "iocpnative", "bench", "--host", "127.0.0.1"]
        cmd = ["taskset", "-c", "1", *program, *args]
        out = (
            subprocess.run(cmd, capture_output=True, text=True, env=env)
            .stdout.strip()
            .splitlines()[-1]
        )
        srv.terminate()
        srv.wait()
        d = json.loads(out)
        if tool == "echoload":
            m, cpu, p99, err = (
                d["msgs_per_s"],
                d["client_cpu_pct"],
                d["latency_us"]["p99"],
                0 if d.get("ok") else 1,
            )
        else:
            m, cpu, p99, err = d["requests_per_s"], d["client_cpu_pct"], d["p99_us"], d["errors"]
        res[tool].append((m, cpu * 1e4 / m))
        print(
            f"round {rnd + 1} {tool:<10} {m:>9.0f} msgs/s  client cpu {cpu:5.1f}%  "
            f"client {cpu * 1e4 / m:5.2f} us/msg  p99 {p99:>8.0f} us  errors {err}",
            flush=True,
        )
for t, v in res.items():
    msgs, us = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
    print(f"median {t:<10} {msgs:>9.0f} msgs/s  client {us:5.2f} us/msg")
