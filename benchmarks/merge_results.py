"""Merge comparison JSONs (``report.json`` of ``ogls-sd report``) of disjoint seeds into one, with its
accuracy-vs-step plot drawn from the runs' recorded curves.

    python benchmarks/merge_results.py runs/plain_s57/report.json runs/plain_s89/report.json \\
        -o docs/results/plain.json --plot docs/img/plain_accuracy_vs_step.png

Every input must use the same accuracy threshold (``ogls-sd report --threshold``) and hold each method
on seeds no other input holds; the methods' statistics are recomputed from the merged runs with the
report's own aggregation (``ogls_sd.report.aggregate_stats``), warm starts are united. A run keeps its
``config`` and ``curve``; ``dir`` still names where it ran.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ogls_sd.report import aggregate_stats


def merge(parts: list[dict], names: list[str]) -> dict:
    thresholds = {p["threshold"] for p in parts}
    if len(thresholds) != 1:
        raise SystemExit(f"inputs use different thresholds {sorted(thresholds)}: re-run `ogls-sd report --threshold`")
    runs, seen = [], {}
    for part, name in zip(parts, names):
        for r in part["runs"]:
            key = (r["method"], r["seed"])
            if key in seen:
                raise SystemExit(f"{name}: {key[0]} seed {key[1]} is also in {seen[key]}")
            seen[key] = name
            runs.append(r)
    runs.sort(key=lambda r: r["seed"])  # per method, values in seed order
    merged = aggregate_stats(runs, thresholds.pop())
    warm = {}
    for part in parts:
        warm.update(part.get("warm_start") or {})
    merged["warm_start"] = dict(sorted(warm.items(), key=lambda kv: int(kv[0])))
    merged["merged_from"] = names
    return merged


def plot_accuracy(merged: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    colours = plt.get_cmap("tab20")  # 20 distinct colours: a dev sweep draws a dozen methods
    for i, m in enumerate(merged["methods"]):
        curves = [dict(map(tuple, r["curve"])) for r in merged["runs"] if r["method"] == m]
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        vals = [[c[s] for c in curves] for s in steps]
        col = colours(i % 20)
        ax.plot(steps, [statistics.fmean(v) for v in vals], label=f"{m} (n={len(curves)})", color=col, lw=1.6,
                marker="o", ms=3)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=col, alpha=0.15, lw=0)
    seeds = sorted({r["seed"] for r in merged["runs"]})
    ax.set_title(f"Held-out greedy accuracy vs step\nmean over seeds {seeds}, shaded min..max", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="report.json files of disjoint seeds")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the merged JSON")
    ap.add_argument("--plot", type=Path, help="write the accuracy-vs-step plot here")
    args = ap.parse_args()
    merged = merge([json.loads(p.read_text()) for p in args.inputs], [str(p) for p in args.inputs])
    if args.plot:
        plot_accuracy(merged, args.plot)
        merged["plots"] = [args.plot.name]
    args.out.write_text(json.dumps(merged, indent=1))
    print(f"{args.out}: {len(merged['runs'])} runs, methods {', '.join(merged['methods'])}")


if __name__ == "__main__":
    main()
