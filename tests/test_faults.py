"""Non-finite steps are skipped, counted and logged; too many in a row stop the run with a checkpoint."""

import json
import warnings

import pytest
import torch

from ogls_sd.algorithms.ogls_sd import OGLSSD
from ogls_sd.config import Config
from ogls_sd.trainer import TrainingHalted, train

from conftest import TINY_OVERRIDES


def _cfg(tmp_path, *extra):
    return Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={tmp_path / 'run'}",
                                               "steering.no_positive=reference", "eval.before_after=false", *extra])


def _nan_on(steps_with_nan):
    real = OGLSSD.loss
    calls = {"step": None}
    real_plan = OGLSSD.plan

    def plan(self, batch, step):
        calls["step"] = step
        return real_plan(self, batch, step)

    def loss(self, plan, micro):
        out, m = real(self, plan, micro)
        if calls["step"] in steps_with_nan:
            out = out * float("nan")
        return out, m

    return plan, loss


def test_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch):
    plan, loss = _nan_on({1})
    monkeypatch.setattr(OGLSSD, "plan", plan)
    monkeypatch.setattr(OGLSSD, "loss", loss)
    summary = train(_cfg(tmp_path, "train.steps=3"))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite/skipped"] for r in recs] == [0.0, 1.0, 0.0]
    assert recs[1]["grad_norm"] is None and recs[0]["grad_norm"] > 0
    assert summary["steps"] == 3


def test_too_many_nonfinite_steps_stop_with_checkpoint_and_unchanged_weights(tmp_path, monkeypatch):
    plan, loss = _nan_on({0, 1, 2, 3, 4})
    monkeypatch.setattr(OGLSSD, "plan", plan)
    monkeypatch.setattr(OGLSSD, "loss", loss)
    with pytest.raises(TrainingHalted, match="2 consecutive steps"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(_cfg(tmp_path, "train.steps=5", "train.max_nonfinite_steps=2"))
    # skipped steps advance the schedule without torch's "scheduler before optimizer" false alarm
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "model.safetensors").is_file()
    from safetensors.torch import load_file

    ws = next((tmp_path / "ws").iterdir())
    before, after = load_file(ws / "model.safetensors"), load_file(ckpt / "model" / "model.safetensors")
    for k in before:
        assert torch.equal(before[k], after[k]), k
