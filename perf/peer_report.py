"""bench_peer.py's report: ratios against the best peer (and their medians over rounds), the side-by-side table, the plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PEERS = ("llama", "openvino")
SYSTEMS = ("llama", "openvino", "ours-inproc", "ours-http")
"""Every system bench_peer runs, in its order (fixes each one's plot colour)."""


def host_speed(run: dict[str, Any]) -> float | None:
    """The host's yardstick around one system's turn (mean of before and after; peer_measure.host_yardstick): our
    int4 kernel's rate where it was taken, else the fp32 matmul's."""
    turns = [run[k] for k in ("host_before", "host_after") if k in run]
    key = "int4_gmacs" if turns and all("int4_gmacs" in t for t in turns) else "matmul_gflops"
    figures = [t[key] for t in turns if key in t]
    return sum(figures) / len(figures) if figures else None


def ratios(runs: dict[str, dict[str, Any]], conc: str) -> dict[str, Any]:
    """Output tok/s of each system over the best peer's, and ours over HTTP over ours in process; and the host's
    yardstick during each system's turn over its value during the best peer's (1.0: the same host speed)."""
    tps = {s: r["points"][conc]["output_throughput"] for s, r in runs.items() if conc in r.get("points", {})}
    best = max((s for s in tps if s in PEERS), key=lambda s: tps[s], default=None)
    out: dict[str, Any] = {"best_peer": best, "over_best_peer": {s: v / tps[best] for s, v in tps.items()} if best
                           else {}}
    for metric in ("ttft_ms", "itl_ms"):  # p50 over the best peer's: below 1 is better; per round, like tok/s
        p50 = {s: r["points"][conc][metric]["p50"] for s, r in runs.items() if conc in r.get("points", {})}
        if best and p50.get(best):
            out[f"{metric[:-3]}_over_best_peer"] = {s: v / p50[best] for s, v in p50.items() if v is not None}
    speeds = {s: host_speed(runs[s]) for s in tps}
    if best and speeds[best] and all(speeds.values()):
        out["host_over_best_peer"] = {s: v / speeds[best] for s, v in speeds.items()}  # type: ignore[operator]
    if "ours-inproc" in tps and "ours-http" in tps:
        out["http_over_inproc"] = tps["ours-http"] / tps["ours-inproc"]
    return out


def median_round(runs: list[dict[str, Any]], concs: list[str]) -> dict[str, Any]:
    """One system's rounds as one result: per concurrency, the point of the round with the median tok/s
    (the lower middle of an even count); the first round's other fields."""
    out = dict(runs[0])
    points = {}
    for c in concs:
        have = sorted((r["points"][c] for r in runs if c in r.get("points", {})), key=lambda p: p["output_throughput"])
        if have:
            points[c] = {**have[(len(have) - 1) // 2], "rounds_output_throughput": [p["output_throughput"] for p in have]}
    if points:
        out["points"] = points
    return out


def median_ratios(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of each ratio (each round's against that round's best peer): tok/s, and the TTFT and
    ITL p50s (the table's point is one round's, the round with the median tok/s; these ratios take every round)."""
    out: dict[str, Any] = {"best_peer": statistics.mode([r["best_peer"] for r in per_round]), "over_best_peer": {}}
    for system in {s for r in per_round for s in r["over_best_peer"]}:
        out["over_best_peer"][system] = statistics.median(r["over_best_peer"][system] for r in per_round if system in r["over_best_peer"])
    for key in ("ttft_over_best_peer", "itl_over_best_peer"):
        have = [r[key] for r in per_round if key in r]
        if have:
            out[key] = {system: statistics.median(h[system] for h in have if system in h) for system in {s for h in have for s in h}}
    if all("host_over_best_peer" in r for r in per_round):
        out["host_over_best_peer"] = {system: statistics.median(r["host_over_best_peer"][system] for r in per_round)
                                      for system in per_round[0]["host_over_best_peer"]}
    if all("http_over_inproc" in r for r in per_round):
        out["http_over_inproc"] = statistics.median(r["http_over_inproc"] for r in per_round)
    if len(per_round) > 1:
        out["by_round"] = per_round
    return out


def print_report(results: dict[str, Any], rat: dict[str, Any]) -> None:
    """The side-by-side table (ms; x best = tok/s over the best peer's), then one summary line per model."""
    heads = ("tok/s", "TTFT p50", "ITL p50", "ITL p99", "TPOT p50", "tok/chunk", "x best")
    print(f"{'model':<8} {'system':<37} {'c':>3}" + "".join(f"{h:>10}" for h in heads))
    for model, runs in results.items():
        for system, run in runs.items():
            if "points" not in run:
                print(f"{model:<8} {run['label']:<37} not run: {run.get('skipped') or run.get('error')}"[:240])
            for c, p in run.get("points", {}).items():
                cells = [p["output_throughput"], p["ttft_ms"]["p50"], p["itl_ms"]["p50"], p["itl_ms"]["p99"],
                         p["tpot_ms"]["p50"], p["tokens_per_chunk"], rat[model][c]["over_best_peer"].get(system)]
                print(f"{model:<8} {run['label']:<37} {c:>3}" + "".join("         -" if v is None else f"{v:>10.2f}"
                      for v in cells) + (f"  SHORT: {p['short_requests']} requests" if p["short_requests"] else "")
                      + (f"  (others busy: {p['other_processes_cores']:.2f} cores)"
                         if p["other_processes_cores"] > 0.2 else ""))
    for model, runs in results.items():
        parts = []
        for c, r in rat[model].items():
            tps = ", ".join(f"{s} {run['points'][c]['output_throughput']:.1f}" for s, run in runs.items()
                            if c in run.get("points", {}))
            ours = ", ".join(f"{s}/{r['best_peer']} {v:.2f}" for s, v in r["over_best_peer"].items() if s not in PEERS)
            http = f", ours-http/ours-inproc {r['http_over_inproc']:.2f}" if "http_over_inproc" in r else ""
            http += "".join(f", {s} {name} p50 {v:.2f}x the best peer's" for key, name in (("ttft_over_best_peer", "TTFT"), ("itl_over_best_peer", "ITL"))
                            for s, v in r.get(key, {}).items() if s not in PEERS and c == "1")
            host = ", host yardstick over the best peer's turn " + ", ".join(
                f"{s} {v:.2f}" for s, v in r["host_over_best_peer"].items() if s not in PEERS) if "host_over_best_peer" in r else ""
            parts.append(f"c={c}: {tps} tok/s ({ours}{http}{host})")
        print(f"summary {model}: " + "; ".join(parts))


def write_plot(results: dict[str, Any], concs: list[str], path: Path) -> None:
    """Per model: output tok/s and TTFT p50 at each concurrency, one bar per system (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False)
    for col, (model, runs) in enumerate(results.items()):
        done = [s for s, r in runs.items() if "points" in r]
        width = 1 / (len(done) + 1)
        for ax, (ylabel, get) in zip(axes[:, col], [("output tok/s", lambda p: p["output_throughput"]),
                                                    ("TTFT p50 (ms)", lambda p: p["ttft_ms"]["p50"])]):
            for i, system in enumerate(done):
                pts = runs[system]["points"]
                bars = ax.bar([x + i * width for x in range(len(concs))], [get(pts[c]) if c in pts else 0
                              for c in concs], width, label=system, color=f"C{SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)}")
                for bar, c in zip(bars, concs):  # hatched: other processes took CPU during that point
                    bar.set_hatch("//" if pts.get(c, {}).get("other_processes_cores", 0) > 0.2 else "")
            ax.set(xticks=[x + (len(done) - 1) * width / 2 for x in range(len(concs))], yscale="log",
                   xticklabels=[f"c={c}" for c in concs], ylabel=ylabel, title=f"{model}: {ylabel}")
        if done:
            axes[0, col].legend(fontsize=8)
    fig.suptitle("hatched: other processes took > 0.2 cores during that point", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
