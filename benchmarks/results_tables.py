"""Print the tables of ``docs/results.md`` from a committed comparison JSON (what ``ogls-sd report`` writes).

    python benchmarks/results_tables.py docs/results/plain.json [--reference ogls_sd]

Prints, in this order: the warm start of every seed (``ogls_sd.report.warm_start_table``), the
method table (mean ± std over seeds of held-out greedy accuracy before, final, best and AUC, and the
final accuracy per seed), the paired differences of ``--reference`` against every other method, and
issue 19's goal check (reference ≥ max(grpo, rft, sdpo, rlcsd) + 2 points, each peer at the best
of its configurations in the file — SDPO at the better of ``sdpo`` and ``sdpo_ctx``, RLCSD at any
``rlcsd+rlcsd.scale=...`` run — and ≥ ogls_lambda0 + 3 points on the mean final accuracy); with ``--tuning`` (a dev sweep of ``NAME+section.key=value``
variants) also every method's configurations and its best. Nothing is typed by hand: results.md
copies these lines.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ogls_sd.report import warm_start_table

# the public peers of the goal (method families, see ``family``): every configuration of a peer in the file
# counts, so SDPO with both reported templates and RLCSD at each modulation scale run
PEERS = ("grpo", "rft", "sdpo", "rlcsd")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def mean_std(d: dict) -> str:
    return f"{pct(d['mean'])} ± {pct(d['std'] or 0.0)}"


def method_lines(methods: dict) -> list[str]:
    """One row per method; the per-seed column names its seeds in the header when every method ran the
    same ones, else in each row (``s0 77.5 / s2 80.0``)."""
    seed_lists = {tuple(row["seeds"]) for row in methods.values()}
    shared = seed_lists.pop() if len(seed_lists) == 1 else None
    head = ["method", "seeds", "acc before (%)", "acc final (%)", "acc best (%)", "AUC (%)",
            f"final per seed ({', '.join(map(str, shared))})" if shared else "final per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in methods.items():
        values = row["accuracy_final"]["values"]
        per_seed = " / ".join(pct(v) if shared else f"s{s} {pct(v)}" for s, v in zip(row["seeds"], values))
        lines.append("| " + " | ".join([name, str(row["n"]), mean_std(row["accuracy_before"]),
                                         mean_std(row["accuracy_final"]), mean_std(row["accuracy_best"]),
                                         mean_std(row["auc"]), per_seed]) + " |")
    return lines


def paired(methods: dict, ref: str, other: str) -> list[float]:
    """Per-seed differences of final accuracy in points, matched by seed."""
    a = dict(zip(methods[ref]["seeds"], methods[ref]["accuracy_final"]["values"]))
    b = dict(zip(methods[other]["seeds"], methods[other]["accuracy_final"]["values"]))
    return [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]


def difference_lines(methods: dict, ref: str) -> list[str]:
    lines = [f"| {ref} minus | mean (points) | per seed |", "|---|---|---|"]
    for other in methods:
        if other == ref:
            continue
        d = paired(methods, ref, other)
        lines.append(f"| {other} | {statistics.fmean(d):+.1f} | {' / '.join(f'{x:+.1f}' for x in d)} |")
    return lines


def goal_line(methods: dict, ref: str) -> str:
    final = {m: 100 * row["accuracy_final"]["mean"] for m, row in methods.items()}
    peers = [m for m in final if family(m) in PEERS]
    best_peer = max(peers, key=final.get)
    margin_peer = final[ref] - final[best_peer]
    line = f"{ref} {final[ref]:.1f} vs best peer {best_peer} {final[best_peer]:.1f} ({margin_peer:+.1f}, needs +2)"
    if "ogls_lambda0" not in final:
        return f"goal not judged (no ogls_lambda0 run): {line}"
    margin_l0 = final[ref] - final["ogls_lambda0"]
    met = margin_peer >= 2 and margin_l0 >= 3
    return (f"goal {'MET' if met else 'NOT met'}: {line} and ogls_lambda0 {final['ogls_lambda0']:.1f} "
            f"({margin_l0:+.1f}, needs +3)")


def family(method: str) -> str:
    """The method a tuned configuration belongs to: ``grpo+train.lr=3e-4`` -> grpo, ``ogls_lam2`` ->
    ogls_sd (lambda), ``sdpo_ctx`` -> sdpo (its two reported configurations)."""
    name = method.split("+")[0]
    if name == "ogls_sd" or name.startswith("ogls_lam"):
        return "ogls_sd"
    return "sdpo" if name.startswith("sdpo") else name


def tuning_lines(methods: dict) -> list[str]:
    """Per method: the configurations tried (mean final accuracy) and the best one, chosen among the
    configurations run on the most seeds (one run on fewer seeds is shown with its seed count, not chosen)."""
    by_family: dict[str, list[str]] = {}
    for name in methods:
        by_family.setdefault(family(name), []).append(name)
    final = {m: 100 * row["accuracy_final"]["mean"] for m, row in methods.items()}
    lines = ["| method | configurations | mean final accuracy per configuration (%) | best |", "|---|---|---|---|"]
    for fam, names in by_family.items():
        most = max(methods[n]["n"] for n in names)
        best = max((n for n in names if methods[n]["n"] == most), key=final.get)
        tried = ", ".join(f"{n} {final[n]:.1f}" + ("" if methods[n]["n"] == most else f" ({methods[n]['n']} of {most} seeds)")
                          for n in names)
        lines.append(f"| {fam} | {len(names)} | {tried} | {best} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a comparison JSON (docs/results/*.json)")
    ap.add_argument("--reference", default="ogls_sd", help="the method the differences are taken from")
    ap.add_argument("--tuning", action="store_true",
                    help="a dev sweep: also print each method's configurations and the best one")
    args = ap.parse_args()
    data = json.loads(args.json.read_text())
    methods = data["methods"]
    if data.get("warm_start"):
        ws = dict(sorted(data["warm_start"].items(), key=lambda kv: int(kv[0])))  # JSON keys are strings
        print(warm_start_table(ws), end="\n\n")
    print("\n".join(method_lines(methods)), end="\n\n")
    if args.tuning:
        print("\n".join(tuning_lines(methods)), end="\n\n")
    if args.reference in methods:
        print("\n".join(difference_lines(methods, args.reference)), end="\n\n")
        print(goal_line(methods, args.reference))


if __name__ == "__main__":
    main()
