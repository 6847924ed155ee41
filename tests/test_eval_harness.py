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
