# ruff: noqa: RUF001  (the titles use the multiplication sign on purpose)
"""docs/benchmarks.png for benchmarks/run.py: the peers.py results of the saturated and the
fixed-rate scenarios as bar charts, one panel per scenario, our servers highlighted.

Drawn from the same JSON as the Markdown tables (summary medians, min and max over the rounds);
matplotlib is needed only here, so run.py still writes the tables without it.
"""

from __future__ import annotations

import io
from pathlib import Path

# (results name, panel title): saturated msgs/s, higher is better.
SATURATED = (
    ("a_50x512", "Saturated: 50 conns × 512 B"),
    ("c_1000x128", "Saturated: 1000 conns × 128 B"),
    ("e_10x65536", "Saturated: 10 conns × 64 KiB"),
)
# Fixed offered rate: server CPU µs per round trip, lower is better.
RATE = (
    ("b_rate30000_50x512", "30,000 round trips/s: 50 conns × 512 B"),
    ("d_rate20000_1000x128", "20,000 round trips/s: 1000 conns × 128 B"),
)
OURS, OTHERS = "#1f6fbf", "#a8a8a8"


def _saturated_bars(d: dict) -> list[tuple[str, float, float, float, bool]]:
    """(server, median, min, max, client-bound) of msgs/s, highest first."""
    bars = []
    for name, x in d["summary"].items():
        vals = [r["msgs_per_s"] for r in d["runs"] if r["server"] == name and r.get("ok")]
        if x.get("msgs_per_s_median") is None or not vals:
            continue  # every run failed: the table says so, there is nothing to draw
        bound = (x.get("client_cpu_pct_median") or 0) >= 95
        bars.append((name, x["msgs_per_s_median"], min(vals), max(vals), bound))
    return sorted(bars, key=lambda b: -b[1])


def _rate_bars(d: dict) -> list[tuple[str, float, float, float, bool]]:
    """(server, median, min, max, saturated) of server CPU µs/msg, lowest first."""
    bars = []
    for name, x in d["summary"].items():
        med = x.get("server_cpu_us_per_msg_median")
        if med is None:
            continue
        lo = x.get("server_cpu_us_per_msg_min", med)
        hi = x.get("server_cpu_us_per_msg_max", med)
        bars.append((name, med, lo, hi, bool(x.get("saturated_runs"))))
    return sorted(bars, key=lambda b: b[1])


def _panel(ax, bars, title: str, xlabel: str, fmt: str, flag: str) -> None:
    """Horizontal bars, best on top; whiskers min..max over the rounds; flagged bars hatched (the
    title says what the hatching means: the labels stay short enough not to run into the panel
    on their left)."""
    names = [b[0] for b in bars]
    meds = [b[1] for b in bars]
    err = [[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]]
    colors = [OURS if b[0].startswith("iocpnative") else OTHERS for b in bars]
    ys = range(len(bars))
    rects = ax.barh(ys, meds, xerr=err, color=colors, ecolor="#333333", capsize=2)
    for rect, b in zip(rects, bars, strict=True):
        if b[4]:
            rect.set_hatch("///")
            rect.set_edgecolor("white")
    ax.set_yticks(list(ys), names, fontsize=8)
    for label, b in zip(ax.get_yticklabels(), bars, strict=True):
        if b[0].startswith("iocpnative"):
            label.set_fontweight("bold")
    ax.invert_yaxis()
    for y, b in zip(ys, bars, strict=True):  # the median, right of its whisker
        ax.annotate(format(b[1], fmt), (b[3], y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7)  # fmt: skip
    if any(b[4] for b in bars):
        title += f"\n(hatched: {flag})"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.margins(x=0.22)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def write_png(docs: dict[str, dict], path: Path) -> bool:
    """Draws the five scenarios into `path`; False (and a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so {path} was not written (the Markdown is; "
              "`nox -s bench` installs it, or `pip install matplotlib`)")  # fmt: skip
        return False
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    from PIL import Image  # a dependency of matplotlib

    fig = plt.figure(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 6)
    thousands = FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k" if v else "0")
    for i, (name, title) in enumerate(SATURATED):
        ax = fig.add_subplot(grid[0, 2 * i : 2 * i + 2])
        _panel(ax, _saturated_bars(docs[name]), title, "round trips/s (higher is better)",
               ",.0f", "client-bound")  # fmt: skip
        ax.xaxis.set_major_formatter(thousands)
    for i, (name, title) in enumerate(RATE):
        ax = fig.add_subplot(grid[1, 3 * i : 3 * i + 3])
        _panel(ax, _rate_bars(docs[name]), title, "server CPU µs per round trip (lower is better)",
               ".2f", "SATURATED")  # fmt: skip
    fig.suptitle(
        "Echo servers side by side (../shared/bench/peers.py): bars = median over the rounds, "
        "whiskers = min..max; iocpnative in blue",
        fontsize=10,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    # A few grey levels of two colours: a 64-colour palette keeps the file a third of the size.
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)
    print(f"wrote {path}")
    return True
