"""ogls-sd report (plots from synthetic metrics.jsonl), eval.every, and ogls-sd compare end to end."""

import json

import pytest
import yaml

from ogls_sd.compare import METHODS, plan_runs, run_compare
from ogls_sd.config import Config
from ogls_sd.report import PLOTS, load_run, write_report

from conftest import TINY_OVERRIDES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(d, method, seed, accs, tmpl):
    d.mkdir(parents=True)
    recs = [{"step": 0, "eval/accuracy": accs[0]}]
    for s in range(1, len(accs)):
        recs.append({"step": s, "eval/accuracy": accs[s], "reward/mean": accs[s], "kl/token": 0.1 * s,
                     "entropy/student": 1.0 / s, "completion/len_mean": 30.0 + s, "tokens/rollout": 1000.0,
                     "markers/template": tmpl * s, "markers/reflection": 0.0})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (d / "run.json").write_text(json.dumps({"method": method, "seed": seed}))
    (d / "summary.json").write_text(json.dumps({"accuracy_before": accs[0], "accuracy_after": accs[-1], "steps": len(accs) - 1}))
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}}))


def test_report_redraws_plots_and_tables_from_metrics(tmp_path):
    _fake_run(tmp_path / "a" / "seed0", "opsd", 0, [0.4, 0.2, 0.0, 0.0], 1.0)
    _fake_run(tmp_path / "a" / "seed1", "opsd", 1, [0.4, 0.3, 0.1, 0.0], 1.0)
    _fake_run(tmp_path / "b" / "seed0", "ogls_context", 0, [0.4, 0.6, 0.8, 0.9], 0.0)
    out = tmp_path / "report"
    rep = write_report([tmp_path / "a", tmp_path / "b" / "seed0"], out, threshold=0.5)
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    m = rep["methods"]
    assert m["opsd"]["n"] == 2 and m["opsd"]["seeds"] == [0, 1]
    assert m["opsd"]["accuracy_final"]["mean"] == 0.0
    assert m["opsd"]["accuracy_best"]["mean"] == pytest.approx(0.25)
    assert m["opsd"]["tokens_to_threshold"]["reached"] == 0
    assert m["ogls_context"]["tokens_to_threshold"]["mean"] == 1000.0  # reached 0.6 after step 1
    # AUC: trapezoid mean over steps 0..3 of 0.4, 0.6, 0.8, 0.9
    assert m["ogls_context"]["auc"]["mean"] == pytest.approx((0.5 + 0.7 + 0.85) / 3)
    md = (out / "report.md").read_text()
    assert "| ogls_context |" in md and "accuracy_vs_tokens.png" in md
    assert json.loads((out / "report.json").read_text())["threshold"] == 0.5
    assert load_run(tmp_path / "a" / "seed1").accuracy_curve()[-1] == (3, 0.0)
    # every run carries its resolved config and its accuracy curve (the evidence files' runs)
    runs = {(r["method"], r["seed"]): r for r in json.loads((out / "report.json").read_text())["runs"]}
    assert len(runs) == 3
    assert runs[("opsd", 1)]["config"] == {"train": {"seed": 1}}
    assert runs[("opsd", 1)]["curve"] == [[0, 0.4], [1, 0.3], [2, 0.1], [3, 0.0]]
    assert runs[("ogls_context", 0)]["curve"] == [[0, 0.4], [1, 0.6], [2, 0.8], [3, 0.9]]


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from ogls_sd.cli import app

    _fake_run(tmp_path / "r", "grpo", 0, [0.3, 0.5], 0.0)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "| grpo |" in res.output and (tmp_path / "out" / "accuracy_vs_step.png").is_file()


def test_plan_runs_share_budgets_and_skip_missing_algorithms(tmp_path, monkeypatch):
    import ogls_sd.compare as compare

    runs = plan_runs(tmp_path, ["opsd", "ogls_context"], [0, 1], "templated", 7, 2, ["train.lr=0.001"])
    assert [(r.method, r.seed) for r in runs] == [("opsd", 0), ("opsd", 1), ("ogls_context", 0), ("ogls_context", 1)]
    cfgs = [Config.load(None, r.overrides) for r in runs]
    assert {c.train.steps for c in cfgs} == {7} and {c.data.seed for c in cfgs} == {0}
    assert {c.rollout.max_new_tokens for c in cfgs} == {32}  # the length of a plain solution (+ EOS)
    assert cfgs[2].steering.fallback_reference == "plain" and cfgs[2].train.lr == 0.001
    monkeypatch.setattr(compare, "ALGORITHMS", ("ogls_sd",))
    warned = []
    runs = plan_runs(tmp_path, ["sft", "ogls_global"], [0], "plain", 2, 1, [], warn=warned.append)
    assert [r.method for r in runs] == ["ogls_global"] and "sft" in warned[0]
    assert set(compare.DEFAULT_METHODS) <= set(METHODS)


def test_method_variants_carry_their_own_settings(tmp_path):
    runs = plan_runs(tmp_path, ["grpo+train.lr=0.0003", "ogls_sd+steering.strength=2+teacher.kind=ema"], [1], "plain",
                     3, 1, ["train.lr=0.001"])
    cfgs = [Config.load(None, r.overrides) for r in runs]
    assert [r.out.name for r in runs] == ["seed1", "seed1"] and runs[0].out.parent.name == "grpo+train.lr=0.0003"
    assert cfgs[0].train.algorithm == "grpo" and cfgs[0].train.lr == 0.0003  # its own setting wins over the shared extra
    assert cfgs[1].steering.strength == 2.0 and cfgs[1].teacher.kind == "ema" and cfgs[1].train.lr == 0.001
    for bad in ["nope+train.lr=1", "grpo+train.lr", "grpo+a/b=1"]:
        with pytest.raises(ValueError, match="--methods"):
            plan_runs(tmp_path, [bad], [0], "plain", 3, 1, [])


def test_ablation_methods_resolve_to_their_settings(tmp_path):
    """Issue 19's ablations: λ ∈ {0, 0.5, 1, 2, 4}, our first negative branch (mean of log-probabilities), the EMA anchor; each is
    the shipped OGLS-SD (λ = 0.5) with one knob changed."""
    names = ["ogls_lambda0", "ogls_lam0_5", "ogls_lam1", "ogls_lam2", "ogls_lam4", "ogls_sd", "ogls_meanlog", "ogls_ema"]
    runs = plan_runs(tmp_path, names, [0], "plain", 3, 1, [])
    cfgs = {r.method: Config.load(None, r.overrides) for r in runs}
    assert [cfgs[m].steering.strength for m in names[:5]] == [0.0, 0.5, 1.0, 2.0, 4.0]
    shipped = cfgs["ogls_sd"].to_dict()
    for m, cfg in cfgs.items():
        assert cfg.train.algorithm == "ogls_sd"
        d = cfg.to_dict()
        changed = {(sec, k) for sec in d for k in d[sec] if d[sec][k] != shipped[sec][k] and (sec, k) != ("train", "output_dir")}
        want = {"ogls_sd": set(), "ogls_lam0_5": set(), "ogls_meanlog": {("steering", "negative_branch")},
                "ogls_ema": {("teacher", "kind"), ("teacher", "ema_decay")}}.get(m, {("steering", "strength")})
        assert changed == want, m
    assert cfgs["ogls_meanlog"].steering.resolve_negative_branch() == "mean_log" != cfgs["ogls_sd"].steering.resolve_negative_branch()
    assert cfgs["ogls_ema"].teacher.kind == "ema"


def test_compare_end_to_end_tiny(tmp_path):
    out = tmp_path / "cmp"
    extra = TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}", "data.eval_size=2", "train.report_to=none"]
    rep = run_compare(out, ["opsd", "ogls_context"], [0], style="plain", steps=2, eval_every=1, extra=extra)
    assert set(rep["methods"]) == {"opsd", "ogls_context"}
    for m in ("opsd", "ogls_context"):
        d = out / m / "seed0"
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [0, 1, 2]
        assert all("eval/accuracy" in r for r in recs)
        assert "markers/template" in recs[1] and "markers/reflection" in recs[1] and "tokens/rollout" in recs[1]
        assert (d / "summary.json").is_file()
    assert len(list((tmp_path / "ws").iterdir())) == 1  # one warm start shared by both methods
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "compare.json").read_text())["status"] == {"opsd/seed0": "done", "ogls_context/seed0": "done"}
    # report.json's runs: the resolved config (config.yaml) and the eval/accuracy curve of metrics.jsonl
    for r in json.loads((out / "report.json").read_text())["runs"]:
        d = out / r["method"] / "seed0"
        assert r["config"] == yaml.safe_load((d / "config.yaml").read_text())
        assert r["config"]["train"]["algorithm"] == {"opsd": "opsd", "ogls_context": "ogls_sd"}[r["method"]]
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert r["curve"] == [[x["step"], x["eval/accuracy"]] for x in recs] and len(r["curve"]) == 3
    # a second call reuses the finished runs
    rep2 = run_compare(out, ["opsd"], [0], style="plain", steps=2, eval_every=1, extra=extra)
    assert json.loads((out / "compare.json").read_text())["status"] == {"opsd/seed0": "cached"}
    assert rep2["methods"]["opsd"]["n"] == 1


def test_single_run_report_plots_only_measured_points(tmp_path):
    """A single run with accuracy measured before and after only: no AUC (needs >= 3 evaluations),
    the accuracy plot shows two markers and no connecting line, the report is titled by the
    algorithm as configured."""
    import json

    import yaml

    from ogls_sd import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"algorithm": "ogls_sd", "seed": 0}}))
    recs = [{"step": 0, "eval/accuracy": 0.3}] + [{"step": s, "reward/mean": 0.1 * s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (run / "summary.json").write_text(json.dumps({"accuracy_before": 0.3, "accuracy_after": 0.6}))
    lines = []
    import matplotlib.axes

    orig = matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        lines.append(k)
        return orig(self, *a, **k)

    matplotlib.axes.Axes.plot = spy
    try:
        agg = report.write_report([run], tmp_path / "out")
    finally:
        matplotlib.axes.Axes.plot = orig
    row = agg["methods"]["ogls_sd"]
    assert row["auc"]["mean"] is None and row["accuracy_final"]["mean"] == 0.6
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Run report: ogls_sd")
    acc = [k for k in lines if k.get("marker") == "o" and k.get("ms") == 5]
    assert acc and all(k["ls"] == "none" for k in acc)


def test_a_killed_run_has_no_final_accuracy_from_step_0(tmp_path):
    """No summary.json and only the step-0 evaluation: the final accuracy is unknown, not the start."""
    from ogls_sd.report import run_stats

    d = tmp_path / "killed"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.4}) + "\n"
                                     + json.dumps({"step": 1, "reward/mean": 0.5, "loss": 0.1}) + "\n")
    st = run_stats(load_run(d), threshold=0.5)
    assert st["accuracy_before"] == 0.4 and st["accuracy_final"] is None
    (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text() + json.dumps({"step": 2, "eval/accuracy": 0.55}) + "\n")
    assert run_stats(load_run(d), threshold=0.5)["accuracy_final"] == 0.55
