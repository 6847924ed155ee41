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
    """Every RNG the loop draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    st = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuplify(st["python"]))
    name, keys, *rest = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


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
        "rng": rng_state(),
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


def load_model_weights(ckpt: Path, model) -> None:
    """Load the checkpoint's weights into ``model`` in place (full model or peft adapter)."""
    mdir = Path(ckpt) / "model"
    adapter = mdir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, load_file(adapter))
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"{adapter}: unexpected adapter keys {res.unexpected_keys[:5]}")
        return
    files = sorted(mdir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{mdir}: no *.safetensors weights")
    from .modeling import unwrap

    target = unwrap(model)
    sd = {}
    for f in files:
        sd.update(load_file(f))
    missing, unexpected = target.load_state_dict(sd, strict=False)
    tied = set(getattr(target, "_tied_weights_keys", None) or [])
    if isinstance(getattr(target, "_tied_weights_keys", None), dict):
        tied = set(target._tied_weights_keys)
    bad_missing = [k for k in missing if k not in tied]
    if unexpected or bad_missing:
        raise ValueError(f"{mdir}: weights do not match the model (missing {bad_missing[:5]}, unexpected {unexpected[:5]})")


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """``resume`` is '' (no resume), 'latest' (newest checkpoint of the run, None if there is none),
    or a checkpoint path."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if not (p / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no trainer_state.pt)")
    return p
