import json

from typer.testing import CliRunner

from ogls_sd.cli import app
from ogls_sd.config import describe_fields

from conftest import TINY_OVERRIDES

runner = CliRunner()


def test_train_help_lists_every_config_field_with_help():
    res = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0
    for key, _default, h in describe_fields():
        assert key in res.output, key
        assert h.split()[0] in res.output


def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path):
    res = runner.invoke(app, ["train", "loss.clip=sometimes"])
    assert res.exit_code == 2
    assert "loss.clip" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "missing.yaml" in res.output


def test_train_end_to_end_writes_summary_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={tmp_path / 'ws'}", "train.steps=2",
            "steering.no_positive=reference", "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    for k in ("algorithm", "steps", "accuracy_before", "accuracy_after", "wall_seconds"):
        assert k in summary
    assert summary["steps"] == 2 and summary["algorithm"] == "ogls_sd"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]  # step 0: held-out accuracy before training (eval.every)
    assert "eval/accuracy" in lines[0] and "reward/mean" in lines[1]
    assert {"reward/mean", "kl/token", "groups/all_incorrect", "grad_norm", "completion/len_mean"} <= set(lines[1])
    assert (out / "config.yaml").is_file()
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "model.safetensors").is_file()
    # the warm start was cached: a second run reuses it
    assert len(list((tmp_path / "ws").iterdir())) == 1
    res = runner.invoke(app, ["eval", *TINY_OVERRIDES, "--checkpoint", str(ckpt), "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "avg@1" in json.loads((tmp_path / "ev" / "results.json").read_text())["benchmarks"]["arith"]
