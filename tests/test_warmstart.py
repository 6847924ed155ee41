"""The tiny model's warm start (src/ogls_sd/warmstart.py): it stops on an accuracy target, records
the greedy accuracy of every prompt format it teaches, writes repairable wrong attempts, and
cleans up temporaries a killed run left behind."""

import json
import os
import random
import subprocess
import sys
import time

import pytest

from ogls_sd.config import Config
from ogls_sd.tasks import get_task, task_templates
from ogls_sd.tasks.arith import ArithTask
from ogls_sd.warmstart import FORMATS, cache_key, clean_stale_temporaries, describe, read_record, warm_start

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
    cfg = _cfg(tmp_path, "warmstart.steps=50", "warmstart.check_every=2", "warmstart.target_accuracy=0.5")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    rec = read_record(path)
    assert rec["steps"] == 4  # checks at 2 (0.0) and 4 (1.0): stopped there, not at the cap of 50
    assert [c["step"] for c in rec["checks"]] == [2, 4]
    assert calls[-1] == ws.FORMATS  # the final measurement covers every format


def test_without_target_runs_the_cap(tmp_path, monkeypatch):
    import ogls_sd.warmstart as ws

    monkeypatch.setattr(ws, "format_accuracies", lambda *a, formats=ws.FORMATS, **k: {f: 1.0 for f in formats})
    cfg = _cfg(tmp_path, "warmstart.steps=5", "warmstart.check_every=1", "warmstart.target_accuracy=0")
    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task))
    assert read_record(path)["steps"] == 5 and read_record(path)["checks"] == []


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
