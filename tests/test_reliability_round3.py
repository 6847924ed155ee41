"""Issue 20 (reliability, third round): no silent wrong result, whatever the input or the fault.

One test (or a parametrised group) per item of the issue; docs/reliability.md names them."""

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ogls_sd.cli import app
from ogls_sd.config import Config, ConfigError

from conftest import TINY_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FAST = ["eval.before_after=false", "train.report_to=none"]


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv("OGLS_SD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # a wrapped message would show up as a second line


def _train_args(out: Path, ws: Path, *extra: str) -> list[str]:
    return ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", *FAST, "-o", str(out), *extra]


def _fails(res, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``error:`` line, no traceback, every needle on that line."""
    assert res.exit_code == code, (res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output, res.output
    errs = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, res.output
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


# ------------------------------------------------------------------ item 1: non-finite / huge numbers
@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"), ("train.lr=1e308", "train.lr"), ("train.weight_decay=inf", "train.weight_decay"),
    ("train.lr=.nan", "train.lr"), ("train.lr=nan", "train.lr"), ("steering.strength=-inf", "steering.strength"),
    ("loss.temperature=inf", "loss.temperature"), ("train.seed=" + "9" * 40, "train.seed"),
    ("train.lr=" + "1" + "0" * 400, "train.lr"),
])
def test_nonfinite_or_huge_numbers_are_refused_at_config_load_cli(tmp_path, override, key):
    res = runner.invoke(app, _train_args(tmp_path / "run", tmp_path / "ws", override))
    _fails(res, 2, key)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_every_numeric_field_is_range_checked_by_the_schema():
    """The rule lives in the schema: any float field refuses inf/nan, any int field a huge value."""
    import dataclasses
    import typing

    checked = 0
    for sf in dataclasses.fields(Config):
        sec = sf.default_factory
        hints = typing.get_type_hints(sec)
        for f in dataclasses.fields(sec):
            bad = {float: [float("inf"), float("nan"), -1e300], int: [2**70, -(2**70)]}.get(hints[f.name], [])
            for v in bad:
                with pytest.raises(ConfigError, match=f"{sf.name}.{f.name}"):
                    Config.load(None, [f"{sf.name}.{f.name}={v!r}" if isinstance(v, int) else f"{sf.name}.{f.name}={v}"])
                checked += 1
    assert checked > 100


def test_weights_made_nonfinite_by_a_step_stop_the_run_before_anything_is_saved(tmp_path, monkeypatch):
    """An optimizer step that leaves an inf weight: one-line error, no checkpoint of those weights."""
    from ogls_sd.trainer import NonFiniteWeights, train

    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # the second optimizer step of the run
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={tmp_path / 'run'}",
                                               "steering.no_positive=reference", "rollout.temperature=2.0", *FAST,
                                               "train.steps=4", "train.save_every=1", "warmstart.steps=0"])
    with pytest.raises(NonFiniteWeights, match="step 2: .*non-finite.*train.lr"):
        train(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_000001"]  # the good checkpoint; nothing of step 2 was written
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1]
    assert not (tmp_path / "run" / "summary.json").exists()
