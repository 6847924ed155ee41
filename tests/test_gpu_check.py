"""benchmarks/gpu_check.py: runs end to end on CPU (--cpu --tiny) and its log-prob check catches
misaligned token ids."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ogls_sd.rollout import Completion, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_on_cpu_tiny(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["ok"] and [r["backend"] for r in summary["results"]] == ["hf"]
    r = summary["results"][0]
    assert r["errors"] == [] and r["steps"] == 2
    for k in ("step_s", "rollout_tok_s", "teacher_tok_s", "student_fwd_bwd_tok_s"):
        assert r[k] > 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"]


class _Backend:
    def __init__(self, model, shift: bool):
        self.model, self.shift = model, shift

    @torch.no_grad()
    def generate(self, prompts, params):
        out = []
        for p in prompts:
            ids = [20, 21, 22, 1]
            lp = torch.log_softmax(self.model(torch.tensor([p + ids])).logits[0], -1)
            rows = range(len(p) - 1, len(p) - 1 + len(ids))
            lps = [float(lp[r, t]) for r, t in zip(rows, ids)]
            if self.shift:  # log-probs of the ids one position off: what a dropped/extra token looks like
                lps = [float(lp[r + 1, t]) for r, t in zip(list(rows)[:-1], ids[:-1])] + [lps[-1]]
            out.append(Completion(ids, True, lps))
        return out


def test_recorder_logprob_check_catches_misalignment(tiny_model):
    gc = _load()
    prompts = [[2, 30, 31, 32, 1, 3]] * 2
    ok = gc.Recorder(_Backend(tiny_model, shift=False), tiny_model, 1, 8)
    ok.generate(prompts, SamplingParams(max_new_tokens=8))
    assert ok.errors == [] and ok.logprob_diff < 1e-4
    bad = gc.Recorder(_Backend(tiny_model, shift=True), tiny_model, 1, 8)
    bad.generate(prompts, SamplingParams(max_new_tokens=8))
    assert bad.logprob_diff > gc.LOGPROB_TOL and "misaligned" in bad.errors[0]
