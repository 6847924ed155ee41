"""benchmarks/merge_results.py and results_tables.py: the scripts docs/results.md's numbers come from."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import merge_results
    import results_tables
finally:
    sys.path.pop(0)


def _run(method, seed, final, curve_shift=0.0):
    curve = [[0, 0.4], [5, 0.5 + curve_shift], [10, final]]
    return {"method": method, "seed": seed, "dir": f"runs/{method}/seed{seed}", "accuracy_before": 0.4,
            "accuracy_final": final, "accuracy_best": max(final, 0.5 + curve_shift), "auc": 0.5 + seed / 100,
            "tokens_to_threshold": None, "rollout_tokens": 1000.0 + seed, "template_markers_final": 0.0,
            "completion_len_final": 20.0, "steps": 10, "wall_seconds": 5.0 + seed, "config": {"train": {"seed": seed}},
            "curve": curve}


def _part(seeds, finals, threshold=0.5):
    runs = [_run(m, s, finals[m][i]) for m in finals for i, s in enumerate(seeds)]
    return {"threshold": threshold, "runs": runs, "warm_start": {str(s): {"steps": 40 * s} for s in seeds}}


def test_merge_recomputes_every_statistic_from_the_united_runs(tmp_path):
    a = _part([5, 6], {"ogls_sd": [0.7, 0.8], "rft": [0.6, 0.65]})
    b = _part([8], {"ogls_sd": [0.9], "rft": [0.5]})
    merged = merge_results.merge([b, a], ["b", "a"])
    row = merged["methods"]["ogls_sd"]
    assert row["seeds"] == [5, 6, 8] and row["accuracy_final"]["values"] == [0.7, 0.8, 0.9]
    assert row["accuracy_final"]["mean"] == pytest.approx(statistics.fmean([0.7, 0.8, 0.9]))
    assert row["accuracy_final"]["std"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.9]))
    assert list(merged["warm_start"]) == ["5", "6", "8"]
    assert all("config" in r and "curve" in r for r in merged["runs"])
    merge_results.plot_accuracy(merged, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_merge_renames_at_once_and_orders_the_tables():
    """A changed default: the old ogls_sd runs become ogls_lam1 and the ogls_lam0_5 runs become ogls_sd."""
    old = _part([5, 6], {"ogls_sd": [0.7, 0.8], "rft": [0.6, 0.65]})
    new = _part([5, 6], {"ogls_lam0_5": [0.75, 0.85]})
    merged = merge_results.merge([old, new], ["old", "new"], {"ogls_sd": "ogls_lam1", "ogls_lam0_5": "ogls_sd"},
                                 ["ogls_sd", "rft"])
    assert list(merged["methods"]) == ["ogls_sd", "rft", "ogls_lam1"]
    assert merged["methods"]["ogls_sd"]["accuracy_final"]["values"] == [0.75, 0.85]
    assert merged["methods"]["ogls_lam1"]["accuracy_final"]["values"] == [0.7, 0.8]
    assert merged["renamed"] == [{"ogls_sd": "ogls_lam1", "ogls_lam0_5": "ogls_sd"}]
    assert old["runs"][0]["method"] == "ogls_sd"  # the inputs are left as they were
    again = merge_results.merge([merged, _part([7], {"rft": [0.5]})], ["merged", "seed7"], {"rft": "rft_lr1e-4"})
    assert again["renamed"][-1] == {"rft": "rft_lr1e-4"} and len(again["renamed"]) == 2
    assert again["merged_from"] == ["old", "new", "seed7"]  # a merged input keeps its own sources
    with pytest.raises(SystemExit, match="ogls_sd seed 5 is also in old"):  # a rename onto a held name is refused
        merge_results.merge([old, new], ["old", "new"], {"ogls_lam0_5": "ogls_sd"})


def test_merge_cli_renames_names_that_hold_settings(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part([0], {"ogls_ema": [0.7]})))
    b.write_text(json.dumps(_part([0], {"ogls_ema+steering.strength=0.5": [0.8]})))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "merge_results.py"), str(a), str(b), "-o", str(tmp_path / "m.json"),
           "--rename", "ogls_ema", "ogls_ema+steering.strength=1", "--rename", "ogls_ema+steering.strength=0.5", "ogls_ema",
           "--order", "ogls_ema"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    methods = json.loads((tmp_path / "m.json").read_text())["methods"]
    assert list(methods) == ["ogls_ema", "ogls_ema+steering.strength=1"]
    assert methods["ogls_ema"]["accuracy_final"]["values"] == [0.8]


def test_merge_refuses_overlapping_seeds_and_mixed_thresholds():
    a = _part([5], {"ogls_sd": [0.7]})
    with pytest.raises(SystemExit, match="seed 5 is also in a"):
        merge_results.merge([a, _part([5], {"ogls_sd": [0.8]})], ["a", "b"])
    with pytest.raises(SystemExit, match="different thresholds"):
        merge_results.merge([a, _part([6], {"ogls_sd": [0.8]}, threshold=0.6)], ["a", "b"])


def _methods(finals):
    return {m: {"seeds": [5, 6], "n": 2, "accuracy_final": {"mean": statistics.fmean(v), "values": v}}
            for m, v in finals.items()}


def test_goal_counts_the_best_sdpo_configuration_and_both_margins():
    finals = {"ogls_sd": [0.80, 0.80], "ogls_lambda0": [0.76, 0.76], "grpo": [0.70, 0.70], "rft": [0.76, 0.76],
              "sdpo": [0.1, 0.1], "sdpo_ctx": [0.77, 0.77], "rlcsd": [0.7, 0.7], "opsd": [0.9, 0.9]}
    line = results_tables.goal_line(_methods(finals), "ogls_sd")  # opsd (90) is not a peer of the goal
    assert line.startswith("goal MET") and "best peer sdpo_ctx 77.0 (+3.0, needs +2)" in line and "(+4.0, needs +3)" in line
    finals["sdpo_ctx"] = [0.79, 0.79]  # SDPO's better configuration counts, not TRL's template alone
    assert results_tables.goal_line(_methods(finals), "ogls_sd").startswith("goal NOT met")
    finals.update(sdpo_ctx=[0.7, 0.7], ogls_lambda0=[0.78, 0.78])  # the lambda = 0 margin alone fails it
    line = results_tables.goal_line(_methods(finals), "ogls_sd")
    assert line.startswith("goal NOT met") and "(+2.0, needs +3)" in line
    finals.update(ogls_lambda0=[0.76, 0.76], **{"rlcsd+rlcsd.scale=1.0": [0.785, 0.785]})  # a tuned RLCSD run counts
    line = results_tables.goal_line(_methods(finals), "ogls_sd")
    assert line.startswith("goal NOT met") and "best peer rlcsd+rlcsd.scale=1.0 78.5 (+1.5, needs +2)" in line
    finals["rlcsd_meanlog"] = [0.9, 0.9]  # our contrast-in-the-advantage ablation is not a peer
    assert "best peer rlcsd+rlcsd.scale=1.0" in results_tables.goal_line(_methods(finals), "ogls_sd")
    del finals["ogls_lambda0"]
    assert results_tables.goal_line(_methods(finals), "ogls_sd").startswith("goal not judged (no ogls_lambda0 run)")
    assert results_tables.paired(_methods({"a": [0.8, 0.6], "b": [0.7, 0.7]}), "a", "b") == pytest.approx([10.0, -10.0])


def test_tables_print_from_a_committed_json():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_tables.py"),
                          str(ROOT / "docs" / "results" / "plain.json")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads((ROOT / "docs" / "results" / "plain.json").read_text())
    final = 100 * data["methods"]["ogls_sd"]["accuracy_final"]["mean"]
    assert f"| ogls_sd | {data['methods']['ogls_sd']['n']} |" in res.stdout and f"{final:.1f} ±" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("goal ")


def test_method_table_names_the_seeds_of_each_row_when_they_differ():
    def row(seeds, finals):
        stat = {"mean": statistics.fmean(finals), "std": 0.0, "values": finals}
        return {"seeds": seeds, "n": len(seeds), "accuracy_before": stat, "accuracy_final": stat,
                "accuracy_best": stat, "auc": stat}
    same = results_tables.method_lines({"a": row([0, 1], [0.5, 0.6]), "b": row([0, 1], [0.7, 0.8])})
    assert "final per seed (0, 1)" in same[0] and same[2].endswith("| 50.0 / 60.0 |")
    mixed = results_tables.method_lines({"a": row([0, 1, 2], [0.5, 0.6, 0.7]), "abl": row([2], [0.9])})
    assert mixed[0].endswith("| final per seed |")
    assert mixed[2].endswith("| s0 50.0 / s1 60.0 / s2 70.0 |") and mixed[3].endswith("| s2 90.0 |")


def test_tuning_groups_configurations_by_method_and_names_the_best():
    methods = _methods({"ogls_sd": [0.7, 0.7], "ogls_lam2": [0.8, 0.8], "grpo": [0.6, 0.6],
                        "grpo+train.lr=3e-4": [0.5, 0.5], "sdpo": [0.1, 0.1], "sdpo_ctx": [0.65, 0.65]})
    rows = {r.split(" | ")[0].strip("| "): r for r in results_tables.tuning_lines(methods)[2:]}
    assert set(rows) == {"ogls_sd", "grpo", "sdpo"}
    assert rows["ogls_sd"].endswith("| 2 | ogls_sd 70.0, ogls_lam2 80.0 | ogls_lam2 |")
    assert rows["grpo"].endswith("| grpo |") and rows["sdpo"].endswith("| sdpo_ctx |")
    methods["sdpo_live"] = {"seeds": [6], "n": 1, "accuracy_final": {"mean": 0.9, "values": [0.9]}}  # fewer seeds
    row = [r for r in results_tables.tuning_lines(methods) if r.startswith("| sdpo |")][0]
    assert row.endswith("sdpo_live 90.0 (1 of 2 seeds) | sdpo_ctx |")


@pytest.mark.parametrize("style", ["plain", "templated"])
def test_committed_comparison_runs_the_shipped_default(style):
    """docs/results/<style>.json: ogls_sd is today's default config (compare's shared settings applied), on
    >= 5 test seeds, every warm start reading a correct attempt at >= 85%, every run with config and curve.
    A changed default fails here until the comparison is re-run (or the difference is shown to be inert)."""
    from ogls_sd.compare import base_overrides, method_settings
    from ogls_sd.config import Config

    data = json.loads((ROOT / "docs" / "results" / f"{style}.json").read_text())
    assert {"ogls_sd", "ogls_lambda0", "grpo", "rft", "sdpo", "rlcsd", "opsd"} <= set(data["methods"])
    assert all(row["n"] >= 5 and min(row["seeds"]) >= 5 for row in data["methods"].values())  # test seeds only
    assert all(w["accuracy"]["context_correct"] >= 0.85 for w in data["warm_start"].values())
    assert all(r["config"] and len(r["curve"]) >= 13 for r in data["runs"])
    algo, own, _ = method_settings("ogls_sd")
    for run in (r for r in data["runs"] if r["method"] == "ogls_sd"):
        cfg = Config.load(None, base_overrides(style, 60, 5) + [f"train.algorithm={algo}", *own, f"train.seed={run['seed']}",
                                                                f"train.output_dir={run['config']['train']['output_dir']}"])
        shipped = json.loads(json.dumps(cfg.to_dict()))
        recorded = json.loads(json.dumps(run["config"]))
        if recorded["teacher"]["ema_decay"] != "auto":  # runs from before teacher.ema_decay became `auto`:
            assert cfg.teacher.resolve_ema_decay("ogls_sd") == recorded["teacher"]["ema_decay"] == 0.999  # what auto gives
            shipped["teacher"]["ema_decay"] = recorded["teacher"]["ema_decay"]
        if recorded["steering"]["negative_branch"] != "auto":  # runs with the branch spelled out, as auto resolves it
            assert cfg.steering.resolve_negative_branch() == recorded["steering"]["negative_branch"] == "log_mean"
            shipped["steering"]["negative_branch"] = recorded["steering"]["negative_branch"]
        assert recorded == shipped, run["seed"]


def _fake_run(d: Path, algorithm: str, seed: int, finished: bool):
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl (with a torn last line), summary."""
    import yaml

    d.mkdir(parents=True)
    cfg = {"train": {"algorithm": algorithm, "seed": seed, "steps": 10},
           "model": {"name": "m"}, "data": {"task": "t", "task_options": {}, "eval_size": 50}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = [{"step": 0, "eval/accuracy": 0.2}]
    recs += [{"step": s, "time/step_s": 10.0 + s, "time/rollout_s": 6.0, "time/train_s": 4.0,
              "throughput/rollout_tok_s": 50.0, "completion/truncated": 0.5,
              **({"eval/accuracy": round(0.2 + s / 100, 2)} if s % 5 == 0 else {})} for s in range(1, 11 if finished else 7)]
    (d / "metrics.jsonl").write_text("\n".join(map(json.dumps, recs)) + '\n{"step": 7, "eval/acc')
    if finished:
        (d / "summary.json").write_text(json.dumps({"accuracy_before": 0.2, "accuracy_after": 0.3, "wall_seconds": 99.0}))


def test_collect_real_model_reads_each_run_once(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import collect_real_model
    finally:
        sys.path.pop(0)
    from ogls_sd.report import load_run

    _fake_run(tmp_path / "a", "ogls_sd", 0, finished=True)
    _fake_run(tmp_path / "b", "grpo", 1, finished=False)
    done = collect_real_model.collect(load_run(tmp_path / "a"), budget=10)
    assert done["curve"] == [[0, 0.2], [5, 0.25], [10, 0.3]] and done["accuracy_at_step_10"] == 0.3
    assert (done["accuracy_before"], done["accuracy_after"], done["wall_seconds"]) == (0.2, 0.3, 99.0)
    assert not done["stopped_early"] and done["method"] == "ogls_sd"
    cut = collect_real_model.collect(load_run(tmp_path / "b"), budget=10)  # stopped at step 6, torn line skipped
    assert cut["stopped_early"] and cut["steps_run"] == 5 and cut["accuracy_at_step_10"] is None
    assert cut["accuracy_after"] == 0.25
    row = collect_real_model.profile_row(load_run(tmp_path / "a"), "ogls_sd | 0")
    assert row == "| ogls_sd | 0 | 10 | 16 | 6 | 4 | 50 | 50% |"  # median step 15.5 s rounds to 16
