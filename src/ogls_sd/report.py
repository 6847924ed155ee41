"""Tables and plots of one or more training runs, from their ``metrics.jsonl`` / ``summary.json``.

``ogls-sd report RUN_DIR...`` (and ``ogls-sd compare`` at its end) writes into the output directory:

* ``report.md`` and ``report.json``: per method, held-out greedy accuracy as mean ± std over seeds
  (before, final, best during training), the area under the accuracy curve (mean accuracy over the
  training steps, trapezoid rule), rollout tokens to reach a threshold accuracy, total rollout
  tokens and the final template-marker rate; ``report.json``'s ``runs`` also hold, per run, its
  resolved ``config`` (``config.yaml`` as a dict) and its accuracy ``curve`` ``[[step, accuracy], ...]``
  (the ``eval/accuracy`` records of ``metrics.jsonl``; ``docs/results/*.json`` are copies of it);
* PNG plots (matplotlib, Agg backend): accuracy vs step and vs cumulative rollout tokens, reward,
  teacher-student KL per token, student entropy, completion length and marker counts per method.

A run directory is any directory holding ``metrics.jsonl``; the method label comes from
``run.json`` (written by ``compare``) or else from the config (algorithm, pooling), the seed from
``train.seed``. Curves are averaged over the seeds of a method (shaded: min..max).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class RunLog:
    dir: Path
    method: str
    seed: int
    records: list[dict]
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], float(r[key])) for r in self.records if key in r and r[key] is not None]

    def accuracy_curve(self) -> list[tuple[int, float]]:
        """``eval/accuracy`` by step; without it, (0, before) and (steps, after) from the summary."""
        c = self.series("eval/accuracy")
        if not c:
            if "accuracy_before" in self.summary:
                c.append((0, float(self.summary["accuracy_before"])))
            if "accuracy_after" in self.summary:
                c.append((int(self.summary.get("steps", self.last_step())), float(self.summary["accuracy_after"])))
        return sorted(c)

    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    def cumulative_tokens(self) -> dict[int, float]:
        """Cumulative rollout tokens after each step (step 0 -> 0)."""
        out, acc = {0: 0.0}, 0.0
        tr = self.config.get("train", {})
        per_step = tr.get("prompts_per_step", 8) * self.config.get("rollout", {}).get("num_generations", 8)
        for r in sorted((r for r in self.records if r.get("step", 0) >= 1), key=lambda r: r["step"]):
            if "tokens/rollout" in r:
                acc += float(r["tokens/rollout"])
            elif "completion/len_mean" in r:
                acc += float(r["completion/len_mean"]) * per_step
            out[r["step"]] = acc
        return out


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Every directory under ``paths`` (inclusive) that holds a ``metrics.jsonl``."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such directory")
        if (p / "metrics.jsonl").is_file():
            found.append(p)
        else:
            found += sorted(m.parent for m in p.rglob("metrics.jsonl"))
    seen, out = set(), []
    for d in found:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _label(cfg: dict) -> str:
    """A run's method name outside a compare run: its algorithm as configured."""
    return cfg.get("train", {}).get("algorithm", "run")


def warm_starts(runs: list["RunLog"]) -> dict[int, dict]:
    """Per seed: the tiny model's warm start (steps, per-format greedy accuracies) as the runs'
    summaries record it (``model.warm_start_*``); seeds whose runs used no warm start are absent."""
    out: dict[int, dict] = {}
    for r in runs:
        info = r.summary.get("model") or {}
        acc = info.get("warm_start_accuracy")
        if acc and r.seed not in out:
            out[r.seed] = {"steps": info.get("warm_start_steps"), "accuracy": acc}
    return dict(sorted(out.items()))


def warm_start_table(ws: dict[int, dict]) -> str:
    """Markdown table of :func:`warm_starts` (accuracies in %)."""
    cols = ("student", "privileged", "context_correct", "context_wrong")
    lines = ["| seed | warm-start steps | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for seed, w in ws.items():
        acc = w["accuracy"]
        cells = [f"{100 * acc[c]:.1f}" if isinstance(acc.get(c), (int, float)) else "–" for c in cols]
        lines.append(f"| {seed} | {w.get('steps', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class ReportError(ValueError):
    """A run file the report cannot read (one line naming the file)."""


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``: JSON objects with an integer ``step``; a line that is
    not one (cut by a kill, not UTF-8, not JSON) is skipped."""
    recs = []
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror or e})") from None
    for line in raw.splitlines():
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError, JSONDecodeError: a run still writing its last line, or damage
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            recs.append(rec)
    return recs


def _read_mapping(path: Path, parse) -> dict:
    """A run's small JSON / YAML file as a mapping ({} when absent); damage is one line naming it."""
    if not path.is_file():
        return {}
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ReportError(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def load_run(d: str | Path) -> RunLog:
    d = Path(d)
    recs = read_records(d / "metrics.jsonl")
    cfg = _read_mapping(d / "config.yaml", yaml.safe_load)
    summ = _read_mapping(d / "summary.json", json.loads)
    meta = _read_mapping(d / "run.json", json.loads)
    method = meta.get("method") or _label(cfg or {})
    seed = int(meta.get("seed", (cfg or {}).get("train", {}).get("seed", 0)))
    return RunLog(d, method, seed, recs, summ, cfg or {})


# ---------------------------------------------------------------------------------- statistics
def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _auc(curve: list[tuple[int, float]]) -> float | None:
    """Mean accuracy over the training steps (trapezoid rule over the evaluated steps); None with
    fewer than 3 evaluations (two points would only say "the mean of before and after")."""
    if len(curve) < 3:
        return None
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(curve, curve[1:]))
    span = curve[-1][0] - curve[0][0]
    return area / span if span > 0 else curve[-1][1]


def run_stats(run: RunLog, threshold: float) -> dict:
    curve = run.accuracy_curve()
    toks = run.cumulative_tokens()
    after = [a for s, a in curve if s >= 1]
    reach = next((toks.get(s) for s, a in curve if s >= 1 and a >= threshold), None)
    last = max((r for r in run.records if r.get("step", 0) >= 1), key=lambda r: r["step"], default={})
    tail = [r for r in run.records if r.get("step", 0) > max(0, run.last_step() - 5)]  # last 5 steps
    tmpl = [r["markers/template"] for r in tail if "markers/template" in r and "reward/mean" in r]  # SFT: no rollouts
    return {
        "method": run.method, "seed": run.seed, "dir": str(run.dir),
        "accuracy_before": run.summary.get("accuracy_before", curve[0][1] if curve and curve[0][0] == 0 else None),
        # a run without summary.json (killed): its last measurement after step 0, never the step-0 value
        "accuracy_final": run.summary.get("accuracy_after", after[-1] if after else None),
        "accuracy_best": max(after) if after else None,
        "auc": _auc(curve),
        "tokens_to_threshold": reach,
        "rollout_tokens": toks.get(run.last_step(), 0.0),
        "template_markers_final": statistics.fmean(tmpl) if tmpl else None,
        "completion_len_final": last.get("completion/len_mean"),
        "steps": run.last_step(),
        "wall_seconds": run.summary.get("wall_seconds"),
        # the evidence of the run itself: its resolved config and its measured accuracy curve
        "config": run.config,
        "curve": [[s, a] for s, a in curve],
    }


def aggregate(runs: list[RunLog], threshold: float) -> dict:
    return aggregate_stats([run_stats(r, threshold) for r in runs], threshold)


def aggregate_stats(per_run: list[dict], threshold: float) -> dict:
    """Per method (in the order the runs first name them): mean, std and per-seed values of every
    :func:`run_stats` figure. Also merges the ``runs`` of several ``report.json`` files."""
    methods: dict[str, dict] = {}
    order = list(dict.fromkeys(p["method"] for p in per_run))
    for m in order:
        rs = [p for p in per_run if p["method"] == m]
        row: dict = {"method": m, "seeds": sorted(p["seed"] for p in rs), "n": len(rs)}
        for k in ("accuracy_before", "accuracy_final", "accuracy_best", "auc", "rollout_tokens",
                  "template_markers_final", "completion_len_final", "wall_seconds"):
            mu, sd = _mean_std([p[k] for p in rs])
            row[k] = {"mean": mu, "std": sd, "values": [p[k] for p in rs]}
        reached = [p["tokens_to_threshold"] for p in rs if p["tokens_to_threshold"] is not None]
        row["tokens_to_threshold"] = {"reached": len(reached), "of": len(rs),
                                      "mean": statistics.fmean(reached) if reached else None, "values":
                                      [p["tokens_to_threshold"] for p in rs]}
        methods[m] = row
    return {"threshold": threshold, "methods": methods, "runs": per_run}


# ---------------------------------------------------------------------------------- tables
def _fmt(d: dict, digits: int = 3, pct: bool = False) -> str:
    if d.get("mean") is None:
        return "–"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.{digits}f}")
    return f"{f(d['mean'])} ± {f(d['std'])}" if d.get("std") else f(d["mean"])


def markdown_table(agg: dict) -> str:
    thr = agg["threshold"]
    head = ["method", "seed list", "acc before (%)", "acc final (%)", "acc best (%)", "AUC (%)",
            f"rollout tokens to {100 * thr:.0f}%", "rollout tokens (total)", "template markers / completion (last 5 steps)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in agg["methods"].items():
        tt = row["tokens_to_threshold"]
        ttxt = f"{tt['mean'] / 1e3:,.0f}k ({tt['reached']}/{tt['of']} seeds)" if tt["mean"] is not None else f"never (0/{tt['of']})"
        rt = row["rollout_tokens"]["mean"]
        lines.append("| " + " | ".join([
            m, ",".join(map(str, row["seeds"])), _fmt(row["accuracy_before"], pct=True),
            _fmt(row["accuracy_final"], pct=True), _fmt(row["accuracy_best"], pct=True), _fmt(row["auc"], pct=True),
            ttxt, f"{rt / 1e3:,.0f}k" if rt else "0", _fmt(row["template_markers_final"], 2),
        ]) + " |")
    return "\n".join(lines)


def per_seed_table(agg: dict) -> str:
    lines = ["| method | seed | before | final | best | AUC | tokens to threshold |", "|---|---|---|---|---|---|---|"]
    f = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for p in agg["runs"]:
        tt = p["tokens_to_threshold"]
        lines.append(f"| {p['method']} | {p['seed']} | {f(p['accuracy_before'])} | {f(p['accuracy_final'])} | "
                     f"{f(p['accuracy_best'])} | {f(p['auc'])} | {'never' if tt is None else f'{tt:,.0f}'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots
PLOTS = {
    # file: (title, y key, x axis, y label)
    "accuracy_vs_step.png": ("Held-out greedy accuracy vs step", "eval/accuracy", "step", "accuracy"),
    "accuracy_vs_tokens.png": ("Held-out greedy accuracy vs rollout tokens", "eval/accuracy", "tokens", "accuracy"),
    "reward.png": ("Training reward (mean over rollouts) vs step", "reward/mean", "step", "reward"),
    "kl.png": ("Teacher-student KL per distilled token vs step", "kl/token", "step", "KL (nats)"),
    "entropy.png": ("Student entropy per distilled token vs step", "entropy/student", "step", "entropy (nats)"),
    "completion_length.png": ("Completion length (tokens, mean) vs step", "completion/len_mean", "step", "tokens"),
    "loop_rate.png": ("Repetition loops (fraction of rollouts) vs step", "completion/loop_frac", "step", "fraction"),
    "template_markers.png": ("Template markers per completion vs step", "markers/template", "step", "count"),
    "reflection_markers.png": ("Reflection markers per completion vs step", "markers/reflection", "step", "count"),
}


def _series(run: RunLog, key: str) -> list[tuple[int, float]]:
    if key == "eval/accuracy":
        return run.accuracy_curve()
    return sorted(run.series(key))


def _method_curve(runs: list[RunLog], key: str, x: str):
    """(xs, mean, lo, hi) over the seeds at the steps all seeds share."""
    per = [dict(_series(r, key)) for r in runs]
    steps = sorted(set.intersection(*[set(p) for p in per])) if per else []
    if not steps:
        return None
    xs = []
    if x == "tokens":
        toks = [r.cumulative_tokens() for r in runs]
        xs = [statistics.fmean(t.get(s, float("nan")) for t in toks) for s in steps]
    else:
        xs = steps
    vals = [[p[s] for p in per] for s in steps]
    return xs, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_all(runs: list[RunLog], out: Path) -> list[Path]:
    """Every plot of :data:`PLOTS` into ``out``, one curve per method (mean over its seeds)."""
    return [plot_metric(runs, fname, out / fname) for fname in PLOTS]


def plot_metric(runs: list[RunLog], fname: str, path: Path) -> Path:
    """One plot of :data:`PLOTS` (``fname`` names which) of ``runs`` into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, key, x, ylabel = PLOTS[fname]
    by_method: dict[str, list[RunLog]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    colours = plt.get_cmap("tab20")  # 20 distinct colours: a dev sweep draws a dozen methods
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    drawn = 0
    for i, (m, rs) in enumerate(by_method.items()):
        c = _method_curve(rs, key, x)
        if c is None:
            continue
        xs, mu, lo, hi = c
        if key in ("kl/token", "entropy/student") and not any(v != 0 for v in mu):
            continue  # no distillation term: nothing measured
        if key.startswith("markers/") and not any(r.series("reward/mean") for r in rs):
            continue  # no rollouts (SFT): nothing was generated to count markers in
        col = colours(i % 20)
        sparse = len(xs) < 3  # two measurements joined by a line would suggest a curve that was not measured
        ax.plot(xs, mu, label=f"{m} (n={len(rs)})", color=col, lw=1.6, ls="none" if sparse else "-",
                marker="o" if key == "eval/accuracy" or sparse else None, ms=5 if sparse else 3)
        if len(rs) > 1:
            ax.fill_between(xs, lo, hi, color=col, alpha=0.15, lw=0)
        drawn += 1
    seeds = sorted({r.seed for r in runs})
    ax.set_title(title + (f"\nmean over seeds {seeds}, shaded min..max" if len(seeds) > 1 else f"\nseed {seeds}"), fontsize=10)
    ax.set_xlabel("cumulative rollout tokens" if x == "tokens" else "optimizer step")
    ax.set_ylabel(ylabel)
    if key == "eval/accuracy":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no run logged this metric", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(paths: list[str | Path], out: str | Path, threshold: float | None = None) -> dict:
    """Load every run under ``paths``, write ``report.md``, ``report.json`` and the PNGs into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = find_runs(paths)
    if not dirs:
        raise FileNotFoundError(f"no metrics.jsonl under {', '.join(map(str, paths))}")
    runs = [load_run(d) for d in dirs]
    order: list[str] = []
    for p in map(Path, paths):  # the method order of a compare run, when there is one
        if (p / "compare.json").is_file():
            order += [m for m in json.loads((p / "compare.json").read_text()).get("methods", []) if m not in order]
    runs.sort(key=lambda r: (order.index(r.method) if r.method in order else len(order), r.method, r.seed))
    if threshold is None:  # default: 10 points above the mean starting accuracy (capped)
        starts = [c[0][1] for c in (r.accuracy_curve() for r in runs) if c and c[0][0] == 0]
        threshold = round(min(0.9, (statistics.fmean(starts) if starts else 0.5) + 0.1), 2)
    agg = aggregate(runs, threshold)
    pngs = plot_all(runs, out)
    agg["plots"] = [p.name for p in pngs]
    agg["warm_start"] = warm_starts(runs)
    meta = {}
    if (out / "compare.json").is_file():
        meta = json.loads((out / "compare.json").read_text())
        agg["compare"] = {k: meta.get(k) for k in ("methods", "seeds", "style", "steps", "eval_every", "extra", "wall_seconds")}
    (out / "report.json").write_text(json.dumps(agg, indent=1))
    single = not meta and len({r.method for r in runs}) == 1
    md = [f"# Run report: {runs[0].method}" if single else "# Comparison report", ""]
    if meta:
        md += [f"Task style `{meta.get('style')}`, {meta.get('steps')} steps, seeds {meta.get('seeds')}, "
               f"held-out accuracy every {meta.get('eval_every')} steps; extra overrides: {meta.get('extra') or 'none'}.", ""]
    md += [f"Held-out greedy accuracy, mean ± std over seeds. AUC: mean accuracy over the training steps. "
           f"Threshold for 'rollout tokens to': {100 * threshold:.0f}%.", "", markdown_table(agg), "",
           "## Per seed", "", per_seed_table(agg), ""]
    if agg["warm_start"]:
        md += ["## Warm starts", "", "Greedy accuracy (%) of each seed's warm-started model in every prompt format "
               "it was trained on (validation problems; `context_*`: the context template with a correct / a wrong "
               "earlier attempt, which the model should repair).", "", warm_start_table(agg["warm_start"]), ""]
    md += ["## Plots", ""]
    md += [f"![{PLOTS[p.name][0]}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return agg


__all__ = ["RunLog", "aggregate", "aggregate_stats", "find_runs", "load_run", "markdown_table", "plot_all", "plot_metric", "write_report"]
