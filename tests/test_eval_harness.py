import json

from typer.testing import CliRunner

from ogls_sd.cli import app

from conftest import TINY_OVERRIDES

runner = CliRunner()


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_eval_writes_metrics_and_settings_and_is_deterministic(tmp_path, tiny_model, tok):
    ckpt = tmp_path / "model"
    _save(tiny_model, tok, ckpt)
    bench = tmp_path / "m500.jsonl"
    rows = [{"problem": f"{i}+{i}", "solution": "", "answer": str(2 * i)} for i in range(3)]
    bench.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        res = runner.invoke(app, ["eval", *TINY_OVERRIDES, "--checkpoint", str(ckpt), "-b", "task",
                                  "-b", f"math500={bench}", "--k", "3", "--seed", "5", "-o", str(out)])
        assert res.exit_code == 0, res.output
        outs.append(out)
    r = json.loads((outs[0] / "results.json").read_text())
    for name in ("arith", "math500"):
        b = r["benchmarks"][name]
        for key in ("avg@3", "pass@1", "pass@3", "maj@3", "format_rate", "mean_length", "n"):
            assert key in b
        assert 0.0 <= b["pass@1"] <= b["pass@3"] <= 1.0
    assert r["benchmarks"]["math500"]["n"] == 3 and r["k"] == 3 and r["seed"] == 5
    for key in ("model", "templates", "sampling", "max_new_tokens", "verifier", "versions", "student_thinking"):
        assert key in r
    for f in ("results.json", "generations_arith.jsonl", "generations_math500.jsonl"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    gens = [json.loads(x) for x in (outs[0] / "generations_math500.jsonl").read_text().splitlines()]
    assert len(gens) == 9 and {"completion", "extracted", "correct", "length"} <= set(gens[0])


def test_eval_unknown_benchmark_is_a_clear_error(tmp_path, tiny_model, tok):
    _save(tiny_model, tok, tmp_path / "m")
    res = runner.invoke(app, ["eval", *TINY_OVERRIDES, "--checkpoint", str(tmp_path / "m"), "-b", "nope",
                              "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope" in res.output


def test_eval_benchmarks_during_training_write_harness_files_and_keep_training_rng(tmp_path, tiny_cfg):
    from ogls_sd.trainer import train

    base = ["train.steps=2", "eval.every=1", "eval.before_after=true"]
    with_eval = train(tiny_cfg(*base, "eval.benchmarks=task", "eval.k=2", f"train.output_dir={tmp_path / 'a'}"))
    without = train(tiny_cfg(*base, f"train.output_dir={tmp_path / 'b'}"))
    for step in (1, 2):
        res = json.loads((tmp_path / "a" / "eval" / f"step_{step:06d}" / "results.json").read_text())
        b = res["benchmarks"]["arith"]  # "task" is labelled with the task name
        assert {"avg@2", "pass@2", "maj@2", "format_rate"} <= b.keys() and res["k"] == 2
        assert (tmp_path / "a" / "eval" / f"step_{step:06d}" / "generations_arith.jsonl").is_file()

    def rows(run):
        out = []
        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            out.append({k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))})
        return out

    # the harness's sampling seed does not leak into training: the same rollouts and losses
    assert rows("a") == rows("b")
    assert with_eval["accuracy_after"] == without["accuracy_after"]


def test_every_table_names_its_decoding_protocol():
    from ogls_sd.eval_harness import protocol

    assert protocol({"greedy": True, "temperature": 1.0}, 1) == "greedy, k=1"
    assert protocol({"greedy": False, "temperature": 1.1, "top_p": 0.95, "top_k": 20}, 4) == "sampled T=1.1 top-p=0.95 top-k=20, k=4"
    assert protocol({"greedy": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}, 1) == "sampled T=1.0, k=1"


def test_eval_table_keeps_whole_rows_off_a_terminal():
    import io

    from rich.console import Console

    from ogls_sd.eval_harness import _print_table

    row = {"n": 200, "avg@4": 0.25, "pass@1": 0.25, "pass@4": 0.5, "maj@4": 0.3, "format_rate": 0.9, "mean_length": 41.5}
    name = "reasoning_gym:basic_arithmetic_with_a_long_name"
    results = {"sampling": {"greedy": False, "temperature": 0.7, "top_p": 1.0, "top_k": 0}, "seed": 0,
               "benchmarks": {name: row}}
    out = io.StringIO()
    _print_table(results, 4, Console(file=out, force_terminal=False))  # a log file: rich's width would be 80
    lines = out.getvalue().splitlines()
    assert any(name in line and "0.250" in line and "41.5" in line for line in lines), out.getvalue()
    assert any("ogls-sd eval (sampled T=0.7, k=4, seed=0)" in line for line in lines)
