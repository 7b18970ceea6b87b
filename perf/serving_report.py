"""bench_serving's report: the table, the one-line summary and the plot of its points."""

from pathlib import Path
from typing import Any

import numpy as np


def point_label(p: dict[str, Any]) -> str:
    return f"c={p['concurrency']}" if p["mode"] == "closed" else f"poisson {p['fraction']:.2f}x ({p['rate']:.2f}/s)"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(points: list[dict[str, Any]]) -> None:
    head = ["point", "ok", "err", "req/s", "tok/s", "good/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50",
            "ITL p99", "E2E p50"]
    rows = [[point_label(p), str(p["completed"]), str(sum(p["errors"].values())), f"{p['request_throughput']:.2f}",
             f"{p['output_throughput']:.1f}", f"{p['goodput']:.2f}", fmt(p["ttft_ms"]["p50"]), fmt(p["ttft_ms"]["p99"]),
             fmt(p["tpot_ms"]["p50"]), fmt(p["itl_ms"]["p50"]), fmt(p["itl_ms"]["p99"]), fmt(p["e2e_ms"]["p50"])]
            for p in points]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def summary_line(points: list[dict[str, Any]]) -> str:
    closed = [p for p in points if p["mode"] == "closed"]
    if not closed:
        return "no closed-loop point completed"
    best = max(closed, key=lambda p: p["output_throughput"])
    c1 = next((p for p in closed if p["concurrency"] == 1), None)
    c10 = next((p for p in closed if p["concurrency"] == 10), max(closed, key=lambda p: p["concurrency"]))
    return "; ".join([f"best {best['output_throughput']:.1f} tok/s ({best['request_throughput']:.2f} req/s) at "
                      f"c={best['concurrency']}", f"c=1 TTFT p50 {fmt(c1['ttft_ms']['p50']) if c1 else '-'} ms",
                      f"c={c10['concurrency']} ITL p50/p99 {fmt(c10['itl_ms']['p50'])}/{fmt(c10['itl_ms']['p99'])} ms"])


def write_plot(points: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib not installed, skipping {path}")
        return
    closed = sorted((p for p in points if p["mode"] == "closed"), key=lambda p: p["concurrency"])
    xs = [p["concurrency"] for p in closed]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs, [p["output_throughput"] for p in closed], "o-")
    ax1.set(xlabel="concurrency", ylabel="output tok/s", title="Output throughput")
    for metric, q, style in [("ttft_ms", "p50", "o-"), ("ttft_ms", "p99", "o--"),
                             ("itl_ms", "p50", "s-"), ("itl_ms", "p99", "s--")]:
        ax2.plot(xs, [p[metric][q] or np.nan for p in closed], style, label=f"{metric[:-3].upper()} {q}")
    ax2.set(xlabel="concurrency", ylabel="ms", title="Latency", yscale="log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
