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


# ------------------------------------------------------- items 2-4: the manifest is the checkpoint's truth
@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("r3run")
    out, ws = base / "run", base / "ws"
    res = runner.invoke(app, ["train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", *FAST,
                              "steering.no_positive=reference", "train.steps=2", "train.save_every=1",
                              "train.keep_last=10", "-o", str(out)], env={"COLUMNS": "4000"})
    assert res.exit_code == 0, (res.output, res.exception)
    return out, ws


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:06d}"


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, not the header
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def test_deleted_manifest_of_a_format_2_checkpoint_is_refused_cli(tmp_path, two_step_run):
    src, ws = two_step_run
    out = _copy_run(src, tmp_path / "run")
    (_step(out, 2) / "manifest.json").unlink()
    _flip(_step(out, 2) / "model" / "model.safetensors")
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=3", "train.keep_last=10",
                                         "--resume", str(_step(out, 2))))
    _fails(res, 1, str(_step(out, 2) / "manifest.json"), "missing", "format 2")
    # latest falls back to the newest checkpoint that verifies (step 1), saying why it skipped step 2
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=3", "train.keep_last=10",
                                         "--resume", "latest"), env={"COLUMNS": "4000"})
    assert res.exit_code == 0, res.output
    assert "skipping checkpoint step_000002" in res.output and "resuming from step_000001" in res.output


def test_stray_safetensors_in_model_dir_is_never_loaded(tmp_path, two_step_run):
    """A ``model_old.safetensors`` next to the real weights: the loader reads exactly the manifest's files."""
    from safetensors.torch import load_file, save_file

    from ogls_sd.checkpoint import load_model_weights, model_weight_files
    from ogls_sd.tiny import char_tokenizer, tiny_llama

    src, _ = two_step_run
    ckpt = _copy_run(src, tmp_path / "run") / "checkpoints" / "step_000002"
    real = load_file(ckpt / "model" / "model.safetensors")
    save_file({k: torch.full_like(v, 7.0) for k, v in real.items()}, ckpt / "model" / "model_old.safetensors")
    assert model_weight_files(ckpt) == [ckpt / "model" / "model.safetensors"]
    tok = char_tokenizer()
    m = tiny_llama(len(tok), hidden=32, layers=1, heads=2, intermediate=64, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id)
    load_model_weights(ckpt, m)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in real.items())


def test_eval_checkpoint_verifies_the_manifest_cli(tmp_path, two_step_run):
    src, _ = two_step_run
    out = _copy_run(src, tmp_path / "run")
    ck = _step(out, 2)
    _flip(ck / "model" / "model.safetensors")
    for given in (ck, ck / "model"):
        res = runner.invoke(app, ["eval", *TINY_OVERRIDES, "--checkpoint", str(given), "-o", str(tmp_path / "ev")],
                            env={"COLUMNS": "4000"})
        _fails(res, 1, f"--checkpoint {given}", str(ck / "model" / "model.safetensors"), "sha256")
    assert not (tmp_path / "ev" / "results.json").exists()
    (ck / "manifest.json").unlink()  # deleted manifest: refused too (state.json says format 2)
    res = runner.invoke(app, ["eval", *TINY_OVERRIDES, "--checkpoint", str(ck), "-o", str(tmp_path / "ev")],
                        env={"COLUMNS": "4000"})
    _fails(res, 1, "manifest.json", "format 2")


# ---------------------------------------------------------- item 5: a mixture never leaks held-out problems
def _rows(path: Path, problems: list[str]) -> Path:
    path.write_text("".join(json.dumps({"problem": p, "solution": f"so \\boxed{{{i}}}", "answer": str(i)}) + "\n"
                            for i, p in enumerate(problems)))
    return path


def test_mixture_problems_shared_by_sources_are_never_both_trained_and_held_out(tmp_path):
    from ogls_sd.tasks import get_task

    probs = [f"What is {i} times {i + 3}?" for i in range(12)]
    a = _rows(tmp_path / "a.jsonl", probs)
    b = _rows(tmp_path / "b.jsonl", [p.upper() if i % 2 else "  " + p + "\u00a0" for i, p in enumerate(probs)] + ["B only?"])
    (tmp_path / "c").mkdir()
    c = _rows(tmp_path / "c" / "c.jsonl", [p.replace("times", "  times ") for p in probs[:6]] + ["C only?", "C two?"])
    cfg = Config.load(None, [f"data.mixture={a}=1,{b}=1,{c}=1", "data.eval_size=3", "data.eval_fraction_max=0.5"])
    task = get_task(cfg.data)
    held = {" ".join(e.problem.split()) for e in task.examples(100, seed=0, split="test")}
    trained = {" ".join(e.problem.split()) for s in range(30) for e in task.examples(8, seed=s)}
    assert held and not held & trained
    # b keeps only its upper-case rows (different text) and "B only?"; c only its two own problems
    assert task.duplicates == 6 + 6
    assert [len(s.all_examples) for s in task.sources] == [12, 7, 2]


@pytest.mark.parametrize("entries, needles", [
    ("{a}=1,{d}/../a.jsonl=1", ["listed twice", "a.jsonl"]),
    ("{a}=inf,{b}=1", ["data.mixture", "must be > 0 and finite"]),
])
def test_mixture_same_file_twice_or_an_infinite_weight_is_refused_cli(tmp_path, entries, needles):
    a = _rows(tmp_path / "a.jsonl", ["x?", "y?"])
    b = _rows(tmp_path / "b.jsonl", ["z?", "w?"])
    (tmp_path / "d").mkdir()
    mix = entries.format(a=a, b=b, d=tmp_path / "d")
    res = runner.invoke(app, _train_args(tmp_path / "run", tmp_path / "ws", f"data.mixture={mix}"))
    _fails(res, 2, *needles)
