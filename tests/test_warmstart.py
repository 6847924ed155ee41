"""The tiny model's warm start (src/ogls_sd/warmstart.py): it stops once the student is in its band
and the model reads a correct attempt in context (or at the cap), switches to the reading mix,
records the greedy accuracy of every prompt format it teaches with budgets derived from the
references, is deterministic per seed, writes repairable wrong attempts, and cleans up temporaries
a killed run left behind."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from safetensors.torch import load_file

from ogls_sd.config import Config, ConfigError
from ogls_sd.tasks import get_task, task_templates
from ogls_sd.tasks.arith import ArithTask
from ogls_sd.templates import PromptBuilder
from ogls_sd.tiny import char_tokenizer
from ogls_sd.warmstart import (FORMATS, _batch, cache_key, clean_stale_temporaries, describe, format_budget,
                               read_record, sft_loss, sft_pairs, validation_examples, warm_start, warm_start_done,
                               warmstart_lr)

from conftest import TINY_OVERRIDES


def _cfg(tmp_path, *extra):
    return Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}", *extra])


def test_record_has_the_four_format_accuracies(tmp_path):
    cfg = _cfg(tmp_path, "warmstart.steps=3", "warmstart.target_accuracy=0")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    rec = read_record(path)
    assert set(rec["accuracy"]) == set(FORMATS) == {"student", "privileged", "context_correct", "context_wrong"}
    assert all(0.0 <= v <= 1.0 for v in rec["accuracy"].values())
    assert rec["steps"] == 3 and rec["validation_size"] == cfg.warmstart.check_size
    assert "context_wrong" in describe(rec)


def test_stops_once_the_target_is_reached(tmp_path, monkeypatch):
    import ogls_sd.warmstart as ws

    calls = []

    def fake(model, tok, prompts, task, examples, cfg, formats=ws.FORMATS):
        calls.append(formats)
        return {f: (1.0 if len(calls) >= 2 else 0.0) for f in formats}  # 2nd check reaches the target

    monkeypatch.setattr(ws, "format_accuracies", fake)
    cfg = _cfg(tmp_path, "warmstart.steps=50", "warmstart.check_every=2", "warmstart.target_accuracy=0.5",
               "warmstart.student_max=1")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    rec = read_record(path)
    assert rec["steps"] == 4  # checks at 2 (0.0) and 4 (1.0): stopped there, not at the cap of 50
    assert rec["stopped"] == "target"
    assert [c["step"] for c in rec["checks"]] == [2, 4]
    assert calls[-1] == ws.FORMATS  # the final measurement covers every format


def test_without_target_runs_the_cap(tmp_path, monkeypatch):
    import ogls_sd.warmstart as ws

    monkeypatch.setattr(ws, "format_accuracies", lambda *a, formats=ws.FORMATS, **k: {f: 1.0 for f in formats})
    cfg = _cfg(tmp_path, "warmstart.steps=5", "warmstart.check_every=1", "warmstart.target_accuracy=0",
               "warmstart.context_target=0")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    assert read_record(path)["steps"] == 5 and read_record(path)["checks"] == []


def _ws(**kw):
    return Config.load(None, [f"warmstart.{k}={v}" for k, v in kw.items()]).warmstart


def test_stopping_rule_needs_the_student_band_and_context_correct():
    ws = _ws(target_accuracy=0.25, student_max=0.5, context_target=0.9)
    assert warm_start_done({"student": 0.3, "context_correct": 0.9}, ws)
    assert warm_start_done({"student": 0.25, "context_correct": 1.0}, ws)  # both ends of the band count
    assert warm_start_done({"student": 0.5, "context_correct": 0.95}, ws)
    assert not warm_start_done({"student": 0.3, "context_correct": 0.89}, ws)  # context not there yet
    assert not warm_start_done({"student": 0.2, "context_correct": 1.0}, ws)  # student below its band
    assert not warm_start_done({"student": 0.51, "context_correct": 1.0}, ws)  # student above its band
    off = _ws(target_accuracy=0.25, student_max=0.5, context_target=0)
    assert warm_start_done({"student": 0.3}, off)  # context_target 0: the band alone decides
    assert not warm_start_done({"student": 0.6}, off)


def test_learning_rate_warms_up_then_drops_in_the_reading_mix():
    ws = _ws(lr=0.002, reading_lr_scale=0.25)
    assert warmstart_lr(1, False, ws) == pytest.approx(0.002 / 20)
    assert warmstart_lr(10, False, ws) == pytest.approx(0.001)
    assert warmstart_lr(20, False, ws) == warmstart_lr(500, False, ws) == pytest.approx(0.002)
    assert warmstart_lr(500, True, ws) == pytest.approx(0.0005)
    with pytest.raises(ConfigError, match="warmstart.reading_lr_scale"):
        _ws(reading_lr_scale=0)


def test_band_must_be_ordered_and_mixes_must_fit():
    with pytest.raises(ConfigError, match="warmstart.student_max"):
        _ws(target_accuracy=0.4, student_max=0.3)
    with pytest.raises(ConfigError, match="warmstart.reading_student_fraction"):
        _ws(reading_student_fraction=0.8, reference_fraction=0.3)
    with pytest.raises(ConfigError, match="warmstart.context_target"):
        _ws(context_target=1.5)


def _scripted_checks(monkeypatch, script):
    """Replace the accuracy measurement: check ``i`` returns ``script[i]`` (the last one repeats);
    the final all-format measurement returns 0.5 everywhere. Returns the list of calls' formats."""
    import ogls_sd.warmstart as ws

    calls, state = [], {"check": -1}

    def fake(model, tok, prompts, task, examples, cfg, formats=ws.FORMATS):
        calls.append(formats)
        if formats == ws.FORMATS:
            return {f: 0.5 for f in formats}
        if formats == ("student",):
            state["check"] += 1
        return {f: script[min(state["check"], len(script) - 1)][f] for f in formats}

    monkeypatch.setattr(ws, "format_accuracies", fake)
    return calls


def test_switches_to_the_reading_mix_and_stops_when_both_hold(tmp_path, monkeypatch):
    import ogls_sd.warmstart as ws

    calls = _scripted_checks(monkeypatch, [{"student": 0.1, "context_correct": 0.2},
                                           {"student": 0.35, "context_correct": 0.6},
                                           {"student": 0.2, "context_correct": 0.7},
                                           {"student": 0.4, "context_correct": 0.8},
                                           {"student": 0.45, "context_correct": 0.95}])
    mixes = []
    real_pairs = ws.sft_pairs
    monkeypatch.setattr(ws, "sft_pairs", lambda *a, reading=False, **k: mixes.append(reading) or real_pairs(*a, reading=reading, **k))
    cfg = _cfg(tmp_path, "warmstart.steps=100", "warmstart.check_every=2", "warmstart.target_accuracy=0.3",
               "warmstart.student_max=0.5", "warmstart.context_target=0.9")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    rec = read_record(path)
    assert rec["steps"] == 10 and rec["stopped"] == "target"
    assert [c["step"] for c in rec["checks"]] == [2, 4, 6, 8, 10]
    assert [c["mix"] for c in rec["checks"]] == ["student", "student", "reading", "student", "reading"]
    # context_correct is measured only where the student has reached its target
    assert ["context_correct" in c for c in rec["checks"]] == [False, True, False, True, True]
    assert calls.count(("context_correct",)) == 3 and calls[-1] == ws.FORMATS
    # steps 1-4 student mix, 5-6 reading (after the check at 4), 7-8 student again, 9-10 reading
    assert mixes == [False] * 4 + [True] * 2 + [False] * 2 + [True] * 2


@pytest.mark.parametrize("script", [
    [{"student": 0.7, "context_correct": 1.0}],  # student overshoots its band
    [{"student": 0.1, "context_correct": 1.0}],  # student never gets there
])
def test_runs_to_the_cap_without_an_in_band_check(tmp_path, monkeypatch, script):
    _scripted_checks(monkeypatch, script)
    cfg = _cfg(tmp_path, "warmstart.steps=7", "warmstart.check_every=2", "warmstart.target_accuracy=0.3",
               "warmstart.student_max=0.5", "warmstart.context_target=0.9")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    rec = read_record(path)
    assert rec["steps"] == 7 and rec["stopped"] == "cap" and [c["step"] for c in rec["checks"]] == [2, 4, 6]


def test_at_the_cap_returns_the_in_band_check_that_read_context_best(tmp_path, monkeypatch):
    """No check meets both conditions: the weights of the in-band check with the highest
    context_correct come back (step 4 here, not the overshooting step 6 nor the last step 7)."""
    import ogls_sd.warmstart as ws

    _scripted_checks(monkeypatch, [{"student": 0.35, "context_correct": 0.80},
                                   {"student": 0.45, "context_correct": 0.88},
                                   {"student": 0.7, "context_correct": 0.99},
                                   {"student": 0.4, "context_correct": 0.85}])
    snapshots = {}
    real_check = ws._check
    def spy(model, *a, **k):
        acc = real_check(model, *a, **k)
        snapshots[len(snapshots) + 1] = {n: t.clone() for n, t in model.state_dict().items()}
        return acc
    monkeypatch.setattr(ws, "_check", spy)
    cfg = _cfg(tmp_path, "warmstart.steps=9", "warmstart.check_every=2", "warmstart.target_accuracy=0.3",
               "warmstart.student_max=0.5", "warmstart.context_target=0.9")
    task = get_task(cfg.data)
    model, _, path = warm_start(cfg, task, task_templates(task))
    rec = read_record(path)
    assert rec["stopped"] == "best_in_band" and rec["steps"] == 4
    assert [c["step"] for c in rec["checks"]] == [2, 4, 6, 8]
    got = model.state_dict()
    assert all(torch.equal(got[n], t) for n, t in snapshots[2].items())  # the check at step 4
    assert not all(torch.equal(got[n], t) for n, t in snapshots[4].items())  # not the later in-band one


def test_reading_mix_gives_the_student_share_to_the_context_format():
    cfg = Config.load(None, ["data.arith_style=templated", "warmstart.student_fraction=0.6",
                             "warmstart.reference_fraction=0.2", "warmstart.reading_student_fraction=0.05",
                             "warmstart.context_correct_share=0.8", "warmstart.reading_context_correct_share=0.95"])
    task = get_task(cfg.data)
    prompts = PromptBuilder(char_tokenizer(), cfg.templates, task_templates(task))
    exs = task.examples(2000, seed=3)

    def shares(reading):
        kinds = [k for k, _, _ in sft_pairs(task, prompts, exs, cfg, random.Random(1), reading=reading)]
        return {k: kinds.count(k) / len(kinds) for k in ("student", "privileged", "context")}

    student_mix, reading_mix = shares(False), shares(True)
    assert abs(student_mix["student"] - 0.6) < 0.04 and abs(student_mix["context"] - 0.2) < 0.04
    assert abs(reading_mix["student"] - 0.05) < 0.02 and abs(reading_mix["privileged"] - 0.2) < 0.04
    assert abs(reading_mix["context"] - 0.75) < 0.04
    # the correct-attempt share of the context format: context_correct_share, reading_context_correct_share
    tok = char_tokenizer()

    def correct_share(reading):
        correct = [tok.decode(p).count(task.plain_reference(ex)) > 0
                   for (k, p, _), ex in zip(sft_pairs(task, prompts, exs, cfg, random.Random(1), reading=reading), exs)
                   if k == "context"]
        return sum(correct) / len(correct)

    assert abs(correct_share(False) - 0.8) < 0.05 and abs(correct_share(True) - 0.95) < 0.02


@pytest.mark.parametrize("style", ["plain", "templated"])
def test_each_format_budget_is_the_length_of_its_reference(style, monkeypatch):
    import ogls_sd.accuracy as ev
    import ogls_sd.warmstart as ws

    cfg = Config.load(None, TINY_OVERRIDES + [f"data.arith_style={style}", "warmstart.check_size=50", "eval.max_new_tokens=32"])
    task = get_task(cfg.data)
    prompts = PromptBuilder(char_tokenizer(), cfg.templates, task_templates(task))
    val = validation_examples(task, cfg)
    # naive reference: one token per character, plus EOS
    plain_len = max(len(task.plain_reference(ex)) for ex in val) + 1
    ref_len = max(len(ex.reference) for ex in val) + 1
    assert format_budget(task, prompts, val, "student") == plain_len <= task.plain_max_tokens()
    assert format_budget(task, prompts, val, "context_correct") == format_budget(task, prompts, val, "context_wrong") == plain_len
    assert format_budget(task, prompts, val, "privileged") == ref_len
    if style == "templated":
        assert ref_len > 2 * cfg.eval.max_new_tokens  # the old budget (2 x 32) cut these references short
    seen = {}

    def fake_eval(model, tok, prompts, task, examples, n, batch_size, prompt_ids=None, kind="student", **where):
        seen.setdefault(kind, set()).add(n)
        return ev.EvalResult(0.0, len(examples), [], [], 0.0)

    monkeypatch.setattr(ws, "evaluate_accuracy", fake_eval)  # the name the warm start calls
    ws.format_accuracies(None, None, prompts, task, val, cfg)
    assert seen == {"student": {plain_len}, "teacher": {ref_len}, "context": {plain_len}}


def test_same_seed_same_weights(tmp_path):
    """Two builds of one seed (through a switch to the reading mix) give identical weights; another seed does not."""
    ov = ["warmstart.steps=6", "warmstart.check_every=2", "warmstart.target_accuracy=0", "warmstart.context_target=0.99",
          "warmstart.batch_size=4"]

    def build(d, seed):
        cfg = Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / d}", f"train.seed={seed}", *ov])
        task = get_task(cfg.data)
        _, _, path = warm_start(cfg, task, task_templates(task))
        rec = read_record(path)
        assert [c["mix"] for c in rec["checks"]] == ["student", "reading"]  # the switch happened
        return load_file(str(path / "model.safetensors"))

    a, b, c = build("a", 0), build("b", 0), build("c", 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_grouped_sft_loss_equals_the_one_batch_loss(tok):
    """Padding each format only to its own longest sequence leaves the loss as one padded batch
    (HF's ``labels=`` loss) and a naive float64 per-token sum."""
    from conftest import peaked_tiny_llama

    model = peaked_tiny_llama(tok).double()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(10, 90, (n,), generator=g).tolist()  # noqa: E731
    pairs = [(rand(int(a)), rand(int(b))) for a, b in torch.randint(2, 30, (9, 2), generator=g)]
    groups = [pairs[:2], pairs[2:7], pairs[7:]]
    ids, att, labels = _batch(pairs, tok.pad_token_id)
    one_batch = model(input_ids=ids, attention_mask=att, labels=labels).loss
    naive, n = 0.0, 0
    for p, t in pairs:
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0], -1)
        for i, y in enumerate(t):
            naive -= logp[len(p) + i - 1, y].item()
            n += 1
    got = sft_loss(model, groups, tok.pad_token_id)
    assert torch.allclose(got, one_batch.double(), rtol=1e-6, atol=0)  # HF computes its loss in float32
    assert abs(got.item() - naive / n) < 1e-9


def test_cache_key_covers_the_new_knobs():
    base = cache_key(Config())
    for ov in ("warmstart.context_target=0.8", "warmstart.student_max=0.6", "warmstart.reading_student_fraction=0.2",
               "warmstart.context_correct_share=0.7", "warmstart.reading_lr_scale=0.5",
               "warmstart.reading_context_correct_share=0.7"):
        assert cache_key(Config.load(None, [ov])) != base, ov
    # a reading mix with the student mix's correct share is the mix from before the knob existed: the keys
    # of caches built then (these two, at 246cb41, when 0.5 was the default) still find them
    before = ["warmstart.reading_context_correct_share=0.5"]
    assert cache_key(Config.load(None, before)) == "a4dcf6631091f246"
    assert cache_key(Config.load(None, before + ["data.arith_style=templated", "train.seed=7"])) == "15c5104ac642dcc5"
    assert Config().warmstart.reading_context_correct_share == 0.9  # the dev-chosen default: a new key
    assert base != "a4dcf6631091f246"
    same = ["warmstart.context_correct_share=0.7", "warmstart.reading_context_correct_share=0.7"]
    assert cache_key(Config.load(None, same)) != cache_key(Config.load(None, same[:1]))  # reading share 0.5 there


def test_wrong_attempts_are_wrong_plausible_and_varied():
    task = ArithTask()
    rng = random.Random(0)
    kinds = set()
    for ex in task.examples(200, seed=1):
        w = task.wrong_attempt(ex, rng)
        assert task.reward(w, ex.answer) == 0.0  # always wrong ...
        right = task.plain_reference(ex)
        assert len(w.split(" ")) == len(right.split(" "))  # ... in the student's own format
        steps_w, steps_r = w.rsplit(" A:", 1)[0], right.rsplit(" A:", 1)[0]
        kinds.add("answer_only" if steps_w == steps_r else "steps")
    assert kinds == {"answer_only", "steps"}


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    cache = tmp_path / "ws"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f"abc.tmp{dead.pid}"
    live = cache / f"abc.tmp{os.getpid()}0"  # a PID that is (almost surely) not running either...
    mine_recent = cache / f"def.tmp{dead.pid}"
    for d in (stale, mine_recent):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        held = cache / f"ghi.tmp{alive.pid}"
        held.mkdir()
        os.utime(held, (old, old))
        removed = clean_stale_temporaries(cache)
        assert stale in removed and not stale.exists()
        assert held.exists() and held not in removed  # its process is alive
        assert mine_recent.exists()  # too recent: may be another node's save in progress
    finally:
        alive.kill()
    assert not live.exists()


def test_a_warm_start_cleans_up_before_building(tmp_path):
    cfg = _cfg(tmp_path, "warmstart.steps=1", "warmstart.target_accuracy=0")
    cache = tmp_path / "ws"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f"{cache_key(cfg)}.tmp{dead.pid}"
    stale.mkdir()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    task = get_task(cfg.data)
    warm_start(cfg, task, task_templates(task))
    assert not stale.exists()
    assert [p.name for p in cache.iterdir()] == [cache_key(cfg)]
