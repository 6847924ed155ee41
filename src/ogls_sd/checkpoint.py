"""Checkpoints: the model (or adapter) in Hugging Face format, plus the trainer state.

Layout of ``<output_dir>/checkpoints/step_<N>/``::

    model/              save_pretrained (safetensors) + tokenizer
    teacher_ema.safetensors   EMA teacher weights (teacher.kind=ema only)
    trainer_state.pt    optimizer, scheduler, step, RNG states (read back with weights_only=True)
    state.json          step and the config hash

A checkpoint is written to ``step_<N>.tmp`` and renamed when complete, so a killed run never leaves
a half-written checkpoint under a final name. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, teacher, keep_last: int = 2,
                    extra: dict | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    ema = teacher.state_dict() if teacher is not None else None
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "teacher_ema.safetensors")
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "rng": {"torch": torch.get_rng_state()},
    }, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=True)


def load_ema(ckpt: Path) -> dict | None:
    p = ckpt / "teacher_ema.safetensors"
    return load_file(p) if p.is_file() else None
