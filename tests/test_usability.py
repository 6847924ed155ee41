"""Usability (issue 14): no silent no-op steps, a held-out split that leaves small files their
training rows, learning-rate schedules, run names, and early errors for missing trackers."""

import json
import shutil
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ogls_sd.cli import app
from ogls_sd.config import Config, ConfigError

from conftest import TINY_OVERRIDES

runner = CliRunner()


def _train(tmp_path: Path, *extra: str, out: str = "run"):
    args = ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={tmp_path / 'ws'}", "train.report_to=none",
            "-o", str(tmp_path / out), *extra]
    return runner.invoke(app, args, terminal_width=400)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _rows(n: int) -> list[dict]:
    return [{"problem": f"{i}+{i}", "solution": f"{i}+{i}={2 * i}", "answer": str(2 * i)} for i in range(1, n + 1)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ 2. no silent no-op


def test_noop_steps_are_counted_and_warned_about(tmp_path):
    # an untrained model (warmstart.steps=0) solves nothing: every group is all-incorrect, and
    # steering.no_positive=skip drops them all, so no step has a loss term
    res = _train(tmp_path, "warmstart.steps=0", "steering.no_positive=skip", "train.steps=4", "eval.before_after=false")
    assert res.exit_code == 0, res.output
    recs = _records(tmp_path / "run")
    assert [r["step/noop"] for r in recs] == [1.0] * 4
    assert all(r["groups/all_incorrect"] == 1.0 for r in recs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["noop_steps"] == 4
    warnings = [ln for ln in res.output.splitlines() if "in a row changed nothing" in ln]
    assert len(warnings) == 1, res.output  # once per streak, after 3 in a row
    w = warnings[0]
    assert "steps 1-3" in w and "all-incorrect" in w and "steering.no_positive=skip" in w
    assert "steering.no_positive=reference|opsd" in w and "rollout.num_generations" in w and "easier task" in w


def test_steps_with_a_loss_term_are_not_noops(tmp_path):
    res = _train(tmp_path, "warmstart.steps=0", "steering.no_positive=reference", "train.steps=3", "eval.before_after=false")
    assert res.exit_code == 0, res.output
    assert [r["step/noop"] for r in _records(tmp_path / "run")] == [0.0] * 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["noop_steps"] == 0
    assert "changed nothing" not in res.output


@pytest.mark.parametrize("algorithm", ["ogls_sd", "grpo", "opsd_grpo"])
def test_one_generation_with_a_sibling_algorithm_is_a_config_error(algorithm):
    res = runner.invoke(app, ["train", f"train.algorithm={algorithm}", "rollout.num_generations=1"], terminal_width=400)
    assert res.exit_code == 2, res.output
    assert "rollout.num_generations" in res.output and f"train.algorithm={algorithm}" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(ConfigError, match=r"rollout\.num_generations: must be >= 2"):
        Config.load(None, [f"train.algorithm={algorithm}", "rollout.num_generations=1"])


@pytest.mark.parametrize("algorithm", ["opsd", "sft", "rft"])
def test_one_generation_is_fine_where_no_siblings_are_needed(algorithm):
    assert Config.load(None, [f"train.algorithm={algorithm}", "rollout.num_generations=1"]).rollout.num_generations == 1


# ------------------------------------------------------------------ 3. held-out split on small files


def test_held_out_split_takes_at_most_a_fifth_of_a_small_file(tmp_path):
    from ogls_sd.tasks import get_task

    p = _jsonl(tmp_path / "d.jsonl", _rows(10))
    task = get_task(Config.load(None, [f"data.task={p}", "data.eval_size=200"]).data)
    assert task.split_sizes == (8, 2)
    assert len(task.examples(200, seed=0, split="test")) == 2
    # more only when asked for explicitly
    task = get_task(Config.load(None, [f"data.task={p}", "data.eval_size=200", "data.eval_fraction_max=0.5"]).data)
    assert task.split_sizes == (5, 5)
    # data.eval_size below the cap: as before
    task = get_task(Config.load(None, [f"data.task={p}", "data.eval_size=1"]).data)
    assert task.split_sizes == (9, 1)
    with pytest.raises(ConfigError, match=r"data\.eval_fraction_max"):
        Config.load(None, ["data.eval_fraction_max=1.5"])


def test_training_on_a_small_file_prints_the_split(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", _rows(10))
    res = _train(tmp_path, f"data.task={p}", "data.eval_size=200", "templates.task_defaults=false",
                 "eval.before_after=false")
    assert res.exit_code == 0, res.output
    assert "data: 10 rows -> 8 training, 2 held out" in res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_split"] == {"train": 8, "held_out": 2}


# ------------------------------------------------------------------ 7. conveniences


def test_lr_schedulers(tmp_path):
    lrs = {}
    for name in ("constant", "linear", "cosine", "constant_with_warmup"):
        res = _train(tmp_path, f"train.lr_scheduler={name}", "train.steps=4", "train.warmup_steps=2", "train.lr=0.001",
                     "eval.before_after=false", out=name)
        assert res.exit_code == 0, res.output
        lrs[name] = [r["lr"] for r in _records(tmp_path / name)]
    # constant: today's schedule (warm-up reaches train.lr at step warmup_steps, then constant)
    assert lrs["constant"] == pytest.approx([0.001] * 4)  # lr after each step: step 1 used 0.0005
    assert lrs["constant_with_warmup"] == pytest.approx([0.0005, 0.001, 0.001, 0.001])
    assert lrs["linear"] == pytest.approx([0.0005, 0.001, 0.0005, 0.0])
    assert lrs["cosine"] == pytest.approx([0.0005, 0.001, 0.0005, 0.0])
    res = runner.invoke(app, ["train", "train.lr_scheduler=exponential"])
    assert res.exit_code == 2 and "train.lr_scheduler" in res.output


def test_cosine_schedule_resumes_exactly(tmp_path, tiny_cfg):
    from safetensors.torch import load_file

    from ogls_sd.checkpoint import CheckpointError
    from ogls_sd.trainer import train

    common = ("train.lr_scheduler=cosine", "train.steps=4", "train.warmup_steps=1", "train.lr=0.001", "train.save_every=1",
              "train.keep_last=0", "eval.before_after=false", "steering.no_positive=reference", "train.report_to=none")
    full = Path(tiny_cfg(*common).train.output_dir)
    train(tiny_cfg(*common))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for s in (3, 4):
        shutil.rmtree(cut / "checkpoints" / f"step_{s:06d}")
    (cut / "summary.json").unlink()
    train(tiny_cfg(*common, f"train.output_dir={cut}", "train.resume=latest"))

    def strip(rs):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                for r in rs if "resume/changed" not in r]  # the copy records its new output_dir

    assert strip(_records(cut)) == strip(_records(full))
    a = load_file(full / "checkpoints" / "step_000004" / "model" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_000004" / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    # a decaying schedule depends on train.steps: changing it on resume is refused
    with pytest.raises(CheckpointError, match=r"train\.lr_scheduler=cosine.*train\.steps"):
        train(tiny_cfg(*common, f"train.output_dir={cut}", "train.resume=latest", "train.steps=6"))


def test_run_name_reaches_the_tracker_and_the_summary(tmp_path, monkeypatch):
    seen = {}

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.__spec__ = ModuleSpec("wandb", None)

    def init(**kw):
        seen.update(kw)
        return FakeRun()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    res = _train(tmp_path, "train.report_to=wandb", "train.run_name=my-run", "eval.before_after=false")
    assert res.exit_code == 0, res.output
    assert seen["name"] == "my-run"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run_name"] == "my-run"
    # default: the run directory's name
    res = _train(tmp_path, "eval.before_after=false", out="other")
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["run_name"] == "other"


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_missing_tracker_is_one_line_before_any_model_is_loaded(tmp_path, monkeypatch, tracker):
    import importlib.util

    import ogls_sd.trainer as trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    monkeypatch.delitem(sys.modules, tracker, raising=False)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the tracker was checked")

    monkeypatch.setattr(trainer, "load_policy", no_model)
    res = _train(tmp_path, f"train.report_to={tracker}")
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: train.report_to=") and f"pip install {tracker}" in lines[0]
    assert not (tmp_path / "ws").exists()


# ------------------------------------------------------------------ 5. plain progress lines off a terminal


def test_plain_step_lines_when_stdout_is_not_a_terminal(tmp_path):
    import re

    res = _train(tmp_path, "train.steps=3", "eval.before_after=false", "eval.every=0")  # CliRunner: not a terminal
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("step ")]
    assert len(lines) == 3, res.output
    for i, ln in enumerate(lines, 1):
        assert re.fullmatch(rf"step {i}/3  reward \d\.\d{{3}}  loss -?\d+\.\d{{4}}  kl -?\d+\.\d{{4}}  tok/s \d+  "
                            r"eta \d+:\d\d:\d\d", ln), ln
    assert "━" not in res.output  # no bar at all: the warm start too reports in plain lines
    assert "warm start (SFT): up to 2 steps" in res.output


def test_eval_every_accuracy_reaches_the_log(tmp_path):
    """The eval.every measurement is printed on its step's line, not only written to metrics.jsonl."""
    import re

    res = _train(tmp_path, "train.steps=2", "eval.before_after=false", "eval.every=2")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and "held-out acc" not in lines[0], res.output
    assert re.search(r"  held-out acc \d\.\d{3}  eta ", lines[1]), lines[1]


def test_log_completions_writes_prompts_rollouts_rewards_and_pools(tiny_cfg, tmp_path):
    """train.log_completions=N: every N steps the first prompts with their rollouts to
    completions.jsonl (and TensorBoard text)."""
    import json

    from ogls_sd.trainer import train

    cfg = tiny_cfg("train.steps=2", "train.log_completions=1", "train.log_completions_prompts=1",
                   "eval.before_after=false", "eval.every=0")
    train(cfg)
    recs = [json.loads(l) for l in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    g = recs[0]["groups"]
    assert len(g) == 1 and "<|user|>" in g[0]["prompt"] and g[0]["answer"]
    assert len(g[0]["rollouts"]) == cfg.rollout.num_generations
    for r in g[0]["rollouts"]:
        assert r["pool"] == ("P" if r["reward"] > 0.5 else "N") and 0 < r["tokens"] <= cfg.rollout.max_new_tokens
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    assert "completions/text_summary" in ea.Tags()["tensors"]


def test_library_progress_bars_are_quiet_by_default(tmp_path, monkeypatch):
    """transformers' weight-loading / GGUF bars would fill a log file: off unless OGLS_SD_LIBRARY_BARS=1."""
    from transformers.utils import logging as hf_logging
    from typer.testing import CliRunner

    from ogls_sd.cli import app

    hf_logging.enable_progress_bar()
    monkeypatch.delenv("OGLS_SD_LIBRARY_BARS", raising=False)
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "missing")])
    assert res.exit_code != 0 and not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    monkeypatch.setenv("OGLS_SD_LIBRARY_BARS", "1")
    CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "missing")])
    assert hf_logging.is_progress_bar_enabled()


def test_torch_threads_by_rule():
    """train.threads=0: OMP_NUM_THREADS wins, else one thread for the tiny model, else torch's default."""
    from ogls_sd.config import Config
    from ogls_sd.trainer import torch_threads

    tiny, named = Config(), Config.load(None, ["model.name=some/hub-model"])
    assert torch_threads(tiny, {}) == 1 and torch_threads(named, {}) is None
    assert torch_threads(tiny, {"OMP_NUM_THREADS": "4"}) is None  # torch reads it itself
    assert torch_threads(Config.load(None, ["train.threads=3"]), {"OMP_NUM_THREADS": "4"}) == 3


def test_check_validates_config_data_and_context_without_training(tmp_path):
    """ogls-sd check: resolved config, rewards, data split and the context rule, nothing written."""
    import json as _json

    from typer.testing import CliRunner

    from ogls_sd.cli import app

    ok = CliRunner().invoke(app, ["check", "--print", "train.steps=2", f"train.output_dir={tmp_path / 'run'}"])
    assert ok.exit_code == 0, ok.output
    assert "train:" in ok.output and "config: ok (train.algorithm=ogls_sd, 2 steps" in ok.output
    assert "model: tiny, context 1024 tokens" in ok.output and not (tmp_path / "run").exists()
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(30)]
    rows[3]["problem"] = "x" * 3000  # longer than the tiny model's context
    data = tmp_path / "d.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    bad = CliRunner().invoke(app, ["check", f"data.task={data}", "data.eval_size=4"])
    assert bad.exit_code != 0 and "exceeds the model's context of 1024 tokens" in bad.output
    assert "d.jsonl:4" in bad.output  # the example is named (file:row)
    cfg_only = CliRunner().invoke(app, ["check", "--no-model", f"data.task={data}", "data.eval_size=4"])
    assert cfg_only.exit_code == 0 and "data: " in cfg_only.output and "model:" not in cfg_only.output
