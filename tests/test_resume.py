"""Exact resume: a run killed with SIGKILL after a checkpoint (mid-step) and resumed ends with the
same weights and the same logged metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from conftest import TINY_OVERRIDES

STEPS = 5
VOLATILE = ("time/", "throughput/")


def _cmd(out: Path, ws: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ogls_sd.cli", "train", *TINY_OVERRIDES, f"warmstart.cache_dir={ws}",
            f"train.steps={STEPS}", "train.save_every=1", "train.keep_last=10", "steering.no_positive=reference",
            "eval.before_after=false", "rollout.num_generations=3", "-o", str(out), *extra]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def test_sigkill_mid_run_then_resume_is_exact(tmp_path):
    ws = tmp_path / "ws"
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cmd(full, ws), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(cut, ws), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = cut / "checkpoints" / "step_000002"
    deadline = time.time() + 300
    while not target.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert target.is_dir(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)  # during step 3 (or its checkpoint)
    proc.wait(timeout=60)
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"

    res = subprocess.run(_cmd(cut, ws, "--resume", "latest"), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    a = load_file(full / "checkpoints" / f"step_{STEPS:06d}" / "model" / "model.safetensors")
    b = load_file(cut / "checkpoints" / f"step_{STEPS:06d}" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert _metrics(full) == _metrics(cut)
    assert [r["step"] for r in _metrics(cut)] == list(range(1, STEPS + 1))
    # wall_seconds counts every segment: at least what the killed segment had recorded at its checkpoint
    first_segment = json.loads((target / "state.json").read_text())["summary"]["wall_seconds"]
    assert json.loads((cut / "summary.json").read_text())["wall_seconds"] >= first_segment > 0
