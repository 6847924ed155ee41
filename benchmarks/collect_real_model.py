"""Collect finished SmolLM2 runs (``ogls-sd train -c configs/smollm2_cpu.yaml ...``) into the evidence
file ``docs/results/real_model.json`` and its plot.

``{"model", "task", "eval_size", "runs": [{"method", "seed", "accuracy_before", "accuracy_after",
"wall_seconds", "config", "curve"}]}``: ``config`` is the run's resolved ``config.yaml``, ``curve`` its
held-out accuracy ``[[step, accuracy], ...]`` from ``metrics.jsonl`` (greedy, ``data.eval_size``
problems). Every run must share model, task and held-out size.

``python benchmarks/collect_real_model.py runs/smollm2_ogls runs/smollm2_grpo runs/smollm2_rft``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def curve(run: Path) -> list[list[float]]:
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/accuracy" in rec:
            points.append([int(rec["step"]), float(rec["eval/accuracy"])])
    return points


def collect(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {"method": summary["algorithm"], "seed": config["train"]["seed"], "run": run.name,
            "accuracy_before": summary.get("accuracy_before"), "accuracy_after": summary.get("accuracy_after"),
            "wall_seconds": summary.get("wall_seconds"), "config": config, "curve": curve(run)}


def plot(evidence: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in evidence["runs"]:
        steps, acc = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(steps, [100 * a for a in acc], marker="o", label=f"{r['run']} ({r['method']})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out accuracy, greedy, n={evidence['eval_size']} (%)")
    ax.set_title(f"{evidence['model']} on {evidence['task']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with summary.json and config.yaml)")
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/results/real_model.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/real_model_accuracy_vs_step.png"))
    args = ap.parse_args()
    runs = [collect(r) for r in args.runs]
    first = runs[0]["config"]
    shared = {"model": first["model"]["name"], "task": first["data"]["task"], "task_options": first["data"]["task_options"],
              "eval_size": first["data"]["eval_size"]}
    for r in runs:
        other = {"model": r["config"]["model"]["name"], "task": r["config"]["data"]["task"],
                 "task_options": r["config"]["data"]["task_options"], "eval_size": r["config"]["data"]["eval_size"]}
        if other != shared:
            raise SystemExit(f"{r['run']}: {other} differs from {runs[0]['run']}: {shared}")
    evidence = {**shared, "runs": runs}
    args.output.write_text(json.dumps(evidence, indent=1) + "\n")
    plot(evidence, args.plot)
    for r in runs:
        print(f"{r['run']}: {r['method']} {r['accuracy_before']} -> {r['accuracy_after']} in {r['wall_seconds']} s")


if __name__ == "__main__":
    main()
