"""Collect finished SmolLM2 runs (``ogls-sd train -c configs/smollm2_cpu.yaml ...``) into the evidence
file ``docs/results/real_model.json`` and its plot.

``{"model", "task", "task_options", "eval_size", "budget_steps", "runs": [{"method", "seed", "run",
"steps_configured", "steps_run", "stopped_early", "accuracy_before", "accuracy_after",
"accuracy_at_step_<budget>", "wall_seconds", "conditions", "config", "curve"}], "by_method": {method:
{"seeds", "accuracy_at_step_<budget>", "mean_at_step_<budget>"}}}``: ``conditions`` says how the run
was run (threads, runs at once: ``--conditions RUN=TEXT``), ``config`` is the run's resolved
``config.yaml``, ``curve`` its held-out accuracy ``[[step, accuracy], ...]`` from ``metrics.jsonl``
(greedy, ``data.eval_size`` problems). Every run must share model, task and held-out size.

``python benchmarks/collect_real_model.py runs/smollm2_ogls runs/smollm2_grpo runs/smollm2_rft
--conditions smollm2_ogls="alone, OMP_NUM_THREADS=2"``
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ogls_sd.report import RunLog, load_run


def profile_row(log: RunLog, method: str) -> str:
    """One markdown row of where a run's steps went (medians over its steps)."""
    steps = [r for r in log.records if "time/step_s" in r]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in steps) if steps else float("nan")

    return (f"| {method} | {len(steps)} | {med('time/step_s'):.0f} | {med('time/rollout_s'):.0f} | "
            f"{med('time/train_s'):.0f} | {med('throughput/rollout_tok_s'):.0f} | "
            f"{100 * statistics.mean(r['completion/truncated'] for r in steps):.0f}% |")


def collect(log: RunLog, budget: int) -> dict:
    """One run's evidence. A run stopped before its configured steps (no summary.json) is recorded up
    to its last held-out measurement, its wall time from its config.yaml (written at start) to its
    metrics.jsonl's last write."""
    run, config = log.dir, log.config
    points = [[s, a] for s, a in log.series("eval/accuracy")]
    if log.summary:
        before, after, wall = (log.summary.get(k) for k in ("accuracy_before", "accuracy_after", "wall_seconds"))
    else:
        before, after = points[0][1], points[-1][1]
        wall = round((run / "metrics.jsonl").stat().st_mtime - (run / "config.yaml").stat().st_mtime, 1)
    at_budget = [a for s, a in points if s == budget]
    return {"method": config["train"]["algorithm"], "seed": config["train"]["seed"], "run": run.name,
            "steps_configured": config["train"]["steps"], "steps_run": points[-1][0] if points else 0,
            "stopped_early": not log.summary, "accuracy_before": before, "accuracy_after": after,
            f"accuracy_at_step_{budget}": at_budget[0] if at_budget else None,
            "wall_seconds": wall, "config": config, "curve": points}


def plot(evidence: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours: dict[str, str] = {}
    for r in evidence["runs"]:
        steps, acc = zip(*r["curve"]) if r["curve"] else ((), ())
        colour = colours.setdefault(r["method"], f"C{len(colours)}")
        ax.plot(steps, [100 * a for a in acc], marker="o", color=colour, linestyle=("-", "--", ":", "-.")[r["seed"] % 4],
                label=f"{r['method']} seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out accuracy, greedy, n={evidence['eval_size']} (%)")
    ax.set_title(f"{evidence['model']} on {evidence['task']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with summary.json and config.yaml)")
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/results/real_model.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/real_model_accuracy_vs_step.png"))
    ap.add_argument("--budget", type=int, default=10, help="the step at which the methods are compared")
    ap.add_argument("--conditions", action="append", default=[], metavar="RUN=TEXT",
                    help="how run directory RUN (its name) was run, e.g. 'alone, OMP_NUM_THREADS=2'; repeatable")
    args = ap.parse_args()
    conditions = dict(c.split("=", 1) for c in args.conditions)
    logs = [load_run(r) for r in args.runs]  # each metrics.jsonl read once
    runs = [collect(log, args.budget) for log in logs]
    for r in runs:
        r["conditions"] = conditions.get(r["run"], "")
    first = runs[0]["config"]
    shared = {"model": first["model"]["name"], "task": first["data"]["task"], "task_options": first["data"]["task_options"],
              "eval_size": first["data"]["eval_size"]}
    for r in runs:
        other = {"model": r["config"]["model"]["name"], "task": r["config"]["data"]["task"],
                 "task_options": r["config"]["data"]["task_options"], "eval_size": r["config"]["data"]["eval_size"]}
        if other != shared:
            raise SystemExit(f"{r['run']}: {other} differs from {runs[0]['run']}: {shared}")
    key = f"accuracy_at_step_{args.budget}"
    by_method: dict[str, dict] = {}
    for r in runs:
        m = by_method.setdefault(r["method"], {"seeds": [], key: []})
        m["seeds"].append(r["seed"])
        m[key].append(r[key])
    for m in by_method.values():
        measured = [a for a in m[key] if a is not None]
        m[f"mean_at_step_{args.budget}"] = round(statistics.mean(measured), 4) if measured else None
    evidence = {**shared, "budget_steps": args.budget, "runs": runs, "by_method": by_method}
    args.output.write_text(json.dumps(evidence, indent=1) + "\n")
    plot(evidence, args.plot)
    print(f"| method | seed | steps run | accuracy before (%) | at step {args.budget} (%) | after (%) | curve (step: %) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        curve_text = ", ".join(f"{s}: {100 * a:.1f}" for s, a in r["curve"])
        at = r[f"accuracy_at_step_{args.budget}"]
        print(f"| {r['method']} | {r['seed']} | {r['steps_run']}{' (stopped)' if r['stopped_early'] else ''} | "
              f"{100 * r['accuracy_before']:.1f} | {'-' if at is None else f'{100 * at:.1f}'} | "
              f"{100 * r['accuracy_after']:.1f} | {curve_text} | {r['wall_seconds']:.0f} |")
    print()
    print(f"| method | seeds | at step {args.budget}, per seed (%) | mean (%) |")
    print("|---|---|---|---|")
    for method, m in by_method.items():
        per_seed = ", ".join("-" if a is None else f"{100 * a:.1f}" for a in m[key])
        mean = m[f"mean_at_step_{args.budget}"]
        print(f"| {method} | {', '.join(map(str, m['seeds']))} | {per_seed} | {'-' if mean is None else f'{100 * mean:.1f}'} |")
    print()
    print("| method | seed | steps | step (s) | rollout (s) | loss + backward + teacher passes (s) | rollout tok/s | truncated |")
    print("|---|---|---|---|---|---|---|---|")
    for log, r in zip(logs, runs):
        print(profile_row(log, f"{r['method']} | {r['seed']}"))


if __name__ == "__main__":
    main()
