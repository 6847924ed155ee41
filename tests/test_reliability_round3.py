"""Issue 20 (reliability, third round): no silent wrong result, whatever the input or the fault.

One test (or a parametrised group) per item of the issue; docs/reliability.md names them."""

import json
import os
from pathlib import Path

import pytest
import torch

from ogls_sd.cli import app
from ogls_sd.config import Config, ConfigError

from conftest import TINY_OVERRIDES
from test_cli_errors import FAST, _plain_env, _train_args, runner  # noqa: F401  (_plain_env: an autouse fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


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

    from ogls_sd.config import section_classes

    checked = 0
    for name, sec in section_classes().items():  # the built-in sections and those algorithms register
        hints = typing.get_type_hints(sec)
        for f in dataclasses.fields(sec):
            bad = {float: [float("inf"), float("nan"), -1e300], int: [2**70, -(2**70)]}.get(hints[f.name], [])
            for v in bad:
                with pytest.raises(ConfigError, match=f"{name}.{f.name}"):
                    Config.load(None, [f"{name}.{f.name}={v!r}" if isinstance(v, int) else f"{name}.{f.name}={v}"])
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


# ------------------------------------------- items 6, 7, 10: a run directory holds one run, checks come first
def _snapshot(run: Path) -> dict:
    import hashlib

    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def _rewrite_manifest(ckpt: Path) -> None:
    from ogls_sd.checkpoint import write_manifest

    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)


@pytest.mark.parametrize("recorded", [True, False])
def test_resume_with_another_number_of_processes_is_refused_cli(tmp_path, two_step_run, recorded):
    """A checkpoint written by 2 processes resumed by 1: refused before anything is written
    (``recorded``: state.json names the number; else it is read from the trainer state's RNG list)."""
    src, ws = two_step_run
    out = _copy_run(src, tmp_path / "run")
    ck = _step(out, 2)
    st = torch.load(ck / "trainer_state.pt", weights_only=True)
    st["rng_ranks"] = [st["rng"], st["rng"]]
    torch.save(st, ck / "trainer_state.pt")
    meta = json.loads((ck / "state.json").read_text())
    if recorded:
        meta["world_size"] = 2
    else:
        meta.pop("world_size", None)
    (ck / "state.json").write_text(json.dumps(meta))
    _rewrite_manifest(ck)
    before = _snapshot(out)
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=3", "train.keep_last=10",
                                         "--resume", "latest"), env={"COLUMNS": "4000"})
    _fails(res, 1, "saved by 2 process(es)", "this launch has 1")
    assert _snapshot(out) == before


def test_fresh_run_in_a_used_directory_is_refused_unless_overwrite_cli(tmp_path, two_step_run):
    src, ws = two_step_run
    out = _copy_run(src, tmp_path / "run")
    before = _snapshot(out)
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=1"),
                        env={"COLUMNS": "4000"})
    _fails(res, 1, str(out), "holds another run", "--overwrite")
    assert _snapshot(out) == before
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=1", "--overwrite"),
                        env={"COLUMNS": "4000"})
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # nothing of the old run left
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert "steps: 1\n" in (out / "config.yaml").read_text()
    # --resume latest now continues the new run (not the old one's summary)
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=2", "--resume", "latest"),
                        env={"COLUMNS": "4000"})
    assert res.exit_code == 0 and "nothing to do" not in res.output, res.output
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]


def test_resume_latest_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path):
    out, ws = tmp_path / "run", tmp_path / "ws"
    out.mkdir()
    (out / "config.yaml").write_text("stale: 1\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n')
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "--resume", "latest"),
                        env={"COLUMNS": "4000"})
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1] and recs[0]["loss"] != 9
    # never silently: one warning line says that nothing was resumed
    said = [ln for ln in res.output.splitlines() if "no checkpoint in" in ln]
    assert len(said) == 1 and said[0].startswith("warning: --resume latest:") and "starting from step 0" in said[0], \
        res.output


def test_refused_resume_writes_nothing_not_even_config_yaml_cli(tmp_path, two_step_run):
    """A resume refused late (the initial weights differ) leaves config.yaml and every other file as they were."""
    src, ws = two_step_run
    out = _copy_run(src, tmp_path / "run")
    ck = _step(out, 2)
    meta = json.loads((ck / "state.json").read_text())
    meta["init_weights"]["sha256"] = "0" * 64
    (ck / "state.json").write_text(json.dumps(meta))
    _rewrite_manifest(ck)
    before = _snapshot(out)
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=3", "train.keep_last=10",
                                         "--resume", str(ck)), env={"COLUMNS": "4000"})
    _fails(res, 1, "initial weights differ")
    assert _snapshot(out) == before


# ------------------------------------------------------------ item 8 (and 13): sizes that generate nothing
@pytest.mark.parametrize("override, needle", [
    ("rollout.batch_size=-1", "rollout.batch_size: must be > 0"), ("rollout.batch_size=0", "rollout.batch_size: must be > 0"),
    ("rollout.top_k=-1", "rollout.top_k: must be >= 0"), ("loss.top_k=0", "loss.top_k: must be > 0"),
    ("train.seed=-1", "train.seed: must be >= 0"), ("model.lora_dropout=1.5", "model.lora_dropout: must be in [0, 1]"),
])
def test_sizes_that_would_generate_nothing_are_refused_cli(tmp_path, override, needle):
    res = runner.invoke(app, _train_args(tmp_path / "run", tmp_path / "ws", override))
    _fails(res, 2, needle)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ----------------------------------------------------------------------------------- item 9: hedges
@pytest.mark.parametrize("completion", [
    r"\boxed{13 \text{ or 12}}", r"\boxed{13 \text{ or } 12}", r"\boxed{12 = 13}", r"\boxed{12 \approx 13}",
    r"\boxed{11=12=13}", r"\boxed{12 \lor 13}", r"\boxed{13 \text{ and 12}}", r"\boxed{13 := 12}",
    r"\boxed{3} or \boxed{4}", r"\boxed{4} or \boxed{3}", r"\boxed{3}, \boxed{4}", r"$\boxed{3}$ \text{or} $\boxed{4}$",
    r"\boxed{3} or maybe \boxed{4}", r"\boxed{12} \quad \boxed{13}",
])
def test_hedges_never_score_for_any_of_their_values(verifier, completion):
    for gold in ("3", "4", "11", "12", "13"):
        r = verifier.verify(completion, gold)
        assert (r.correct, r.reason) == (False, "hedge"), (completion, gold, r)


@pytest.mark.parametrize("completion, gold", [
    (r"\boxed{x = 13}", "13"), (r"\boxed{2+2=4}", "4"), (r"\boxed{\frac{8}{2} = 4}", "4"), (r"\boxed{4} and \boxed{4}", "4"),
    (r"First \boxed{3}. Then we find the final answer \boxed{4}", "4"), ("\\boxed{3}\n\nSo the answer is \\boxed{4}", "4"),
    (r"\boxed{x = 2 \text{ or } x = 3}", r"x = 2 \text{ or } x = 3"), (r"\boxed{\frac{1}{2} = 0.5}", "0.5"),
])
def test_single_answers_are_not_hedges(verifier, completion, gold):
    r = verifier.verify(completion, gold)
    assert r.reason != "hedge", (completion, r)
    if "or" not in gold:
        assert r.correct, (completion, gold, r)


def test_hedge_rule_agrees_with_math_verify_on_box_sets():
    """Where math-verify reads several boxes as one set answer, the graded answer is a hedge."""
    from math_verify import parse

    from ogls_sd.rewards.verifier import is_hedge, extract_answer

    for text in (r"\boxed{3} or \boxed{4}", r"\boxed{3}, \boxed{4}", r"\boxed{3} \quad \boxed{4}",
                 r"First \boxed{3}. Then we find the final answer \boxed{4}", r"\boxed{4} and \boxed{4}"):
        mv_set = len(parse(text)[1].split(",")) > 1
        assert is_hedge(text, extract_answer(text), "4") == mv_set, text


# ------------------------------------------------------------ item 12 (and 13): lists are checked first
def _alias_bomb(levels: int = 9) -> str:
    """A flow-style YAML list whose last item expands to 10**levels strings (about 400 bytes)."""
    items = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("where, needle", [
    ("train.reflection_markers", "item 0"), ("train.output_dir", "expected a string"), ("train.steps", "expected an integer"),
    ("eval.benchmarks", "item 0"),
])
def test_yaml_alias_bomb_in_a_field_is_refused_at_once_cli(tmp_path, where, needle):
    import time

    section, key = where.split(".")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(f"{section}:\n  {key}: {_alias_bomb()}\n")
    assert len(cfg.read_bytes()) < 600
    t0 = time.time()
    out = [] if where == "train.output_dir" else ["-o", str(tmp_path / "run")]  # -o would replace the bomb
    res = runner.invoke(app, ["train", "-c", str(cfg), *out])
    assert time.time() - t0 < 60  # expanding it would take hours
    _fails(res, 2, where, needle)
    assert len(res.output) < 600


def test_list_items_are_type_checked_and_bounded_cli(tmp_path):
    res = runner.invoke(app, _train_args(tmp_path / "run", tmp_path / "ws", "train.reflection_markers=[1, 2]"))
    _fails(res, 2, "train.reflection_markers", "item 0", "expected a string")
    big = tmp_path / "big.yaml"
    big.write_text("eval:\n  benchmarks: [" + ", ".join(["task"] * 1001) + "]\n")
    res = runner.invoke(app, ["train", "-c", str(big), "-o", str(tmp_path / "run")])
    _fails(res, 2, "eval.benchmarks", "1001 items")


# ------------------------------------------------------ item 11: FSDP2 sharded checkpoint failures are one line
def test_sharded_checkpoint_failure_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """torch.distributed.checkpoint's CheckpointException is a BaseException: save_sharded and
    load_sharded turn it into a CheckpointError (an Exception, printed as one line), with "no space
    left on device" when a process ran out of disk."""
    import errno
    import traceback

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ogls_sd.checkpoint import CheckpointError
    from ogls_sd.sharding import Sharding

    def failing(exc):
        def run(*a, **k):
            raise CheckpointException("dcp failed", {0: (exc, traceback.StackSummary()),
                                                     1: (exc, traceback.StackSummary())})
        return run

    class Fake:  # only what save_sharded / load_sharded touch before the collective call
        def _sharded_state(self, optimizer, teacher):
            return {"optimizer": {}}

    target = tmp_path / "step_000002.sharded.tmp"
    monkeypatch.setattr(dcp, "save", failing(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError) as ei:
        Sharding.save_sharded(Fake(), target, None, None)
    assert str(target) in str(ei.value) and "no space left on device" in str(ei.value)
    assert "\n" not in str(ei.value) and isinstance(ei.value, Exception)
    monkeypatch.setattr(dcp, "load", failing(FileNotFoundError(2, "No such file", ".metadata")))
    with pytest.raises(CheckpointError, match=r"reading the sharded .* failed on process\(es\) 0, 1 \(FileNotFoundError"):
        Sharding.load_sharded(Fake(), tmp_path / "sharded", None, None)


# ------------------------------------------------------------ item 13: unclear messages become one line
def test_json_rows_beyond_parser_limits_are_bad_rows_not_crashes(tmp_path):
    from ogls_sd.data.files import DataError, load_examples

    good = [json.dumps({"problem": f"p{i}?", "solution": "s", "answer": str(i)}) for i in range(4)]
    huge = '{"problem": "q?", "solution": "s", "answer": ' + "7" * 5000 + "}"
    deep = '{"problem": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}'
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([good[0], huge, good[1], deep, good[2], good[3]]) + "\n")
    cols = {"problem": "problem", "answer": "answer", "reference": "solution"}
    res = load_examples(str(path), columns=cols, policy="skip")
    assert len(res.examples) == 4 and res.skipped == 2
    with pytest.raises(DataError) as ei:
        load_examples(str(path), columns=cols, policy="error")
    msg = str(ei.value)
    assert str(path) in msg and "line 2" in msg and "4300 digits" in msg and "\n" not in msg
    whole = tmp_path / "rows.json"
    whole.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_examples(str(whole), columns=cols, policy="skip")


@pytest.mark.parametrize("timeout", [float("inf"), 0, -1, float("nan"), "soon"])
def test_verifier_timeout_must_be_a_positive_finite_number(timeout):
    from ogls_sd.rewards.verifier import Verifier, verify

    with pytest.raises(ValueError, match="timeout"):
        verify(r"\boxed{4}", "4", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        Verifier(timeout=timeout)


def test_huge_yaml_integer_in_a_file_or_override_is_one_line_cli(tmp_path):
    res = runner.invoke(app, _train_args(tmp_path / "run", tmp_path / "ws", "train.steps=" + "9" * 5000))
    assert len(_fails(res, 2, "train.steps", "expected an integer")) < 400
    f = tmp_path / "big.yaml"
    f.write_text("train:\n  steps: " + "9" * 5000 + "\n")
    res = runner.invoke(app, ["train", "-c", str(f), "-o", str(tmp_path / "run")])
    _fails(res, 2, str(f), "4300 digits")


def test_write_limits_are_named_exactly(tmp_path, monkeypatch):
    """ulimit -f (EFBIG) is not "no space left on device"; a full disk while appending metrics names the file."""
    import errno

    from ogls_sd import checkpoint as ck
    from ogls_sd.trainer import MetricsLog

    assert "ulimit -f" in ck.write_failure(OSError(errno.EFBIG, "File too large")) and \
        "no space" not in ck.write_failure(OSError(errno.EFBIG, "File too large"))
    assert ck.write_failure(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on device")
    assert ck.write_failure(ValueError("x")) is None
    log = MetricsLog(tmp_path / "metrics.jsonl")

    class Full:
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    log.f = Full()
    with pytest.raises(OSError) as ei:
        log.write({"step": 1})
    assert str(tmp_path / "metrics.jsonl") in str(ei.value) and "No space left" in str(ei.value)


def test_markup_in_the_output_path_and_damaged_metrics_cli(tmp_path):
    """``a[/]b`` is a path, not rich markup: training and resuming work; a metrics line that is
    not UTF-8 is dropped on resume and by the report; a damaged summary.json is one line naming it."""
    out, ws = tmp_path / "a[/]b", tmp_path / "ws"
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference"), env={"COLUMNS": "4000"})
    assert res.exit_code == 0, res.output
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 1, "loss": "\xff\xfe"}\n')
    res = runner.invoke(app, _train_args(out, ws, "steering.no_positive=reference", "train.steps=2", "--resume", "latest"),
                        env={"COLUMNS": "4000"})
    assert res.exit_code == 0, res.output
    assert str(out) in res.output
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe not utf-8\n[1, 2]\n')
    res = runner.invoke(app, ["report", str(out), "-o", str(tmp_path / "rep")], env={"COLUMNS": "4000"})
    assert res.exit_code == 0, res.output
    (out / "summary.json").write_bytes(b'{"steps": 2, "accur')
    res = runner.invoke(app, ["report", str(out), "-o", str(tmp_path / "rep")], env={"COLUMNS": "4000"})
    _fails(res, 1, str(out / "summary.json"), "unreadable")


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_warm_start_cache_or_model_file_is_one_line_naming_it_cli(tmp_path, two_step_run, damage):
    """Item 14 (decided: verify) and 13: a cached warm start is checked against the sha256 in its
    warmstart.json before a fresh run uses it; a damaged plain model directory in ``eval`` names it."""
    import shutil

    src, ws = two_step_run
    ws2 = tmp_path / "ws"
    shutil.copytree(ws, ws2)
    cached = next(p for p in ws2.iterdir() if (p / "model.safetensors").is_file())
    assert len(json.loads((cached / "warmstart.json").read_text())["weights_sha256"]) == 64
    weights = cached / "model.safetensors"
    _flip(weights) if damage == "flipped byte" else weights.write_bytes(weights.read_bytes()[:1000])
    res = runner.invoke(app, _train_args(tmp_path / "run", ws2, "steering.no_positive=reference"), env={"COLUMNS": "4000"})
    _fails(res, 1, str(weights), "sha256 differs", f"delete {cached}")
    assert not (tmp_path / "run" / "config.yaml").exists()
    plain = tmp_path / "plain"
    shutil.copytree(_step(src, 2) / "model", plain)
    (plain / "model.safetensors").write_bytes((plain / "model.safetensors").read_bytes()[:1000])
    res = runner.invoke(app, ["eval", *TINY_OVERRIDES, "--checkpoint", str(plain), "-o", str(tmp_path / "ev")],
                        env={"COLUMNS": "4000"})
    _fails(res, 1, f"--checkpoint {plain}", "cannot load the model", "SafetensorError")


def test_the_same_answer_twice_joined_by_or_is_not_a_hedge(verifier):
    for text in (r"\boxed{\frac{1}{2} \text{ or } 0.5}", r"\boxed{12 \text{ or } 12}", r"\boxed{3/4 or 0.75}"):
        r = verifier.verify(text, "0.5" if "frac" in text else ("12" if "12" in text else "0.75"))
        assert (r.correct, r.reason) == (True, "ok"), (text, r)
    r = verifier.verify(r"\boxed{\frac{1}{2} \text{ or } 0.6}", "0.5")
    assert r.reason == "hedge"


# ----------------------------------------------------- items 6 and 11 with real processes (torchrun, gloo)
def _torchrun_train(out: Path, ws: Path, *extra: str, limit_bytes: int | None = None):
    import resource
    import subprocess

    from test_data_parallel import _env, torchrun_cmd

    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    cmd = torchrun_cmd(2, "-m", "ogls_sd.cli", "train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}", *FAST,
                       "steering.no_positive=reference", "-o", str(out), *extra)
    return subprocess.run(cmd, cwd=out.parent, env=dict(_env(), COLUMNS="4000"), capture_output=True, text=True,
                          timeout=900, preexec_fn=limit)


def test_one_process_checkpoint_resumed_by_two_is_refused_torchrun(tmp_path, two_step_run):
    src, ws = two_step_run
    out = _copy_run(src, tmp_path / "run")
    before = _snapshot(out)
    res = _torchrun_train(out, ws, "train.steps=3", "train.keep_last=10", "--resume", "latest")
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "saved by 1 process(es), this launch has 2" in text, text[-3000:]
    assert _snapshot(out) == before


def test_fsdp_file_size_limit_during_the_sharded_write_is_one_line_per_process_torchrun(tmp_path, two_step_run):
    """ulimit -f below the size of an optimizer shard: every process says so in one line (no
    tracebacks), the partial step_N.sharded.tmp is removed, nothing else is left behind."""
    _, ws = two_step_run  # the warm start is cached (it would not fit under the limit either)
    out = tmp_path / "run"
    out.mkdir()
    res = _torchrun_train(out, ws, "train.fsdp=true", "train.steps=2", "train.save_every=1", limit_bytes=30_000)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    errs = [ln for ln in text.splitlines() if "error:" in ln and "sharded" in ln]
    assert len(errs) == 2 and all("file size limit (ulimit -f)" in e for e in errs), text[-4000:]
    assert all(f"{out / 'checkpoints' / 'step_000001.sharded.tmp'}" in e for e in errs)
    rank_tracebacks = [ln for ln in text.splitlines() if "CheckpointException" in ln]
    assert not rank_tracebacks, text[-4000:]
    assert not (out / "checkpoints" / "step_000001.sharded.tmp").exists()
    assert not (out / "checkpoints" / "step_000001").exists()


def test_list_item_type_follows_the_annotation():
    """A section with a ``list[float]`` field (as an algorithm's own section may declare) gets its
    items type- and range-checked; a bare ``list`` holds strings."""
    from dataclasses import dataclass

    from ogls_sd.config import _Section, opt

    @dataclass
    class Weights(_Section):
        _section = "weights"
        values: list[float] = opt(None, "some weights", factory=lambda: [0.5, 1])
        names: list = opt(None, "some names", factory=lambda: ["a"])

    Weights()
    with pytest.raises(ConfigError, match=r"weights.values: item 1 is 'x' \(str\), expected a number"):
        Weights(values=[1.0, "x"])
    with pytest.raises(ConfigError, match=r"weights.values\[0\]: must be a finite number"):
        Weights(values=[float("inf")])
    with pytest.raises(ConfigError, match=r"weights.names: item 0 is 1 \(int\), expected a string"):
        Weights(names=[1])
