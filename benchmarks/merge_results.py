"""Merge comparison JSONs (``report.json`` of ``ogls-sd report``) of disjoint seeds into one, with its
accuracy-vs-step plot drawn from the runs' recorded curves.

    python benchmarks/merge_results.py runs/plain_s57/report.json runs/plain_s89/report.json \\
        -o docs/results/plain.json --plot docs/img/plain_accuracy_vs_step.png

    python benchmarks/merge_results.py docs/results/plain.json runs/plain_lam05/report.json -o docs/results/plain.json \
        --rename ogls_sd ogls_lam1 --rename ogls_lam0_5 ogls_sd --order ogls_sd,ogls_lam1

Every input must use the same accuracy threshold (``ogls-sd report --threshold``) and hold each method
on seeds no other input holds (after ``--rename OLD NEW``, which renames runs of every input at once, so a
default that changed can keep the name ``ogls_sd`` for the runs that ran its settings; a rename is
recorded under ``renamed``); the methods' statistics are recomputed from the merged runs with the
report's own aggregation (``ogls_sd.report.aggregate_stats``), warm starts are united. A run keeps its
``config`` and ``curve``; ``dir`` still names where it ran.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ogls_sd.report import RunLog, aggregate_stats, plot_metric


def merge(parts: list[dict], names: list[str], rename: dict[str, str] | None = None,
          order: list[str] | None = None) -> dict:
    """The united runs of ``parts``; ``rename`` maps old method names to new ones (all at once, so a swap
    works); ``order`` puts these methods first in the tables, the rest after in the order runs name them."""
    rename, order = rename or {}, order or []
    thresholds = {p["threshold"] for p in parts}
    if len(thresholds) != 1:
        raise SystemExit(f"inputs use different thresholds {sorted(thresholds)}: re-run `ogls-sd report --threshold`")
    runs, seen = [], {}
    for part, name in zip(parts, names):
        for r in part["runs"]:
            r = {**r, "method": rename.get(r["method"], r["method"])}
            key = (r["method"], r["seed"])
            if key in seen:
                raise SystemExit(f"{name}: {key[0]} seed {key[1]} is also in {seen[key]}")
            seen[key] = name
            runs.append(r)
    rank = {m: i for i, m in enumerate(order)}
    runs.sort(key=lambda r: (rank.get(r["method"], len(rank)), r["seed"]))  # per method, values in seed order
    merged = aggregate_stats(runs, thresholds.pop())
    warm = {}
    for part in parts:
        warm.update(part.get("warm_start") or {})
    merged["warm_start"] = dict(sorted(warm.items(), key=lambda kv: int(kv[0])))
    merged["merged_from"] = [src for part, name in zip(parts, names) for src in part.get("merged_from", [name])]
    renamed = [step for part in parts for step in part.get("renamed", [])] + ([rename] if rename else [])
    if renamed:
        merged["renamed"] = renamed  # every rename applied on the way here, oldest first
    return merged


def plot_accuracy(merged: dict, out: Path) -> None:
    """The report's accuracy-vs-step plot (``report.plot_metric``) from the runs' recorded curves."""
    logs = [RunLog(Path(r["dir"]), r["method"], r["seed"], [{"step": s, "eval/accuracy": a} for s, a in r["curve"]],
                   config=r["config"]) for r in merged["runs"]]
    order = list(merged["methods"])
    logs.sort(key=lambda log: order.index(log.method))  # methods in the table's order, seeds in order within
    plot_metric(logs, "accuracy_vs_step.png", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="report.json files (or merged JSONs) holding disjoint (method, seed) runs")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the merged JSON")
    ap.add_argument("--plot", type=Path, help="write the accuracy-vs-step plot here")
    ap.add_argument("--rename", action="append", nargs=2, default=[], metavar=("OLD", "NEW"),
                    help="rename method OLD to NEW in every input (repeatable; applied at once, so swaps work; "
                         "names may hold '=': ogls_ema+steering.strength=1)")
    ap.add_argument("--order", default="", help="comma-separated methods to list first (the rest follow)")
    args = ap.parse_args()
    rename = dict(args.rename)
    if len(rename) != len(args.rename):
        ap.error("--rename: a method is renamed twice")
    merged = merge([json.loads(p.read_text()) for p in args.inputs], [str(p) for p in args.inputs], rename,
                   [m for m in args.order.split(",") if m])
    if args.plot:
        plot_accuracy(merged, args.plot)
        merged["plots"] = [args.plot.name]
    args.out.write_text(json.dumps(merged, indent=1))
    print(f"{args.out}: {len(merged['runs'])} runs, methods {', '.join(merged['methods'])}")


if __name__ == "__main__":
    main()
