"""Resuming a run: which checkpoint to continue from, whether continuing from it would be exact,
and restoring the training state from it.

A resume that could not be exact (fewer steps than done, changed settings, other initial weights,
another number of processes, missing or corrupt state) is refused with a one-line
:class:`~ogls_sd.checkpoint.CheckpointError` before anything is loaded or written
(:func:`find_resume`, :meth:`Resume.check_world_size`, :meth:`Resume.check_initial_weights`);
:func:`restore_training_state` then loads the optimizer, scheduler, EMA teacher and summary, and
:func:`seed_sampling` the sampling RNG of each process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .checkpoint import (CheckpointError, check_resume_config, checkpoint_dirs, load_ema, load_trainer_state, rank_rng,
                         read_state, resolve_resume, restoring, saved_world_size, set_rng_state, step_of)
from .config import Config
from .parallel import warn


@dataclass
class Resume:
    """Where a run continues from: ``ckpt`` (None: a fresh run), its ``state.json`` (``state``),
    the allowed config changes ``{key: (old, new)}`` and, once restored, its ``trainer_state.pt``."""

    ckpt: Path | None = None
    state: dict = field(default_factory=dict)
    changes: dict = field(default_factory=dict)
    trainer_state: dict | None = None

    @property
    def active(self) -> bool:
        return self.ckpt is not None

    def finished(self, run: Path, cfg: Config) -> dict | None:
        """The summary of a run that already reached ``train.steps`` (nothing to do), else None."""
        return finished_summary(run, self.state["step"], cfg) if self.active else None

    def check_world_size(self, now: int) -> None:
        """Before anything is loaded: the recorded number of processes, if any."""
        if self.active:
            check_world_size(self.ckpt, self.state.get("world_size"), now)

    def check_initial_weights(self, init_weights: dict) -> None:
        if self.active:
            check_initial_weights(self.ckpt, self.state, init_weights)


def find_resume(cfg: Config, run: Path, console: Console) -> Resume:
    """``train.resume`` resolved and checked against ``cfg`` (see :func:`check_resume`)."""
    ckpt = resolve_resume(run, cfg.train.resume, warn=lambda msg: warn(console, msg))
    if ckpt is None:
        return Resume()
    state = read_state(ckpt)
    return Resume(ckpt, state, check_resume(cfg, run, ckpt, state, console))


def restore_training_state(resume: Resume, parallel, opt, sched, teacher, summary: dict, console: Console) -> tuple[int, float]:
    """Load the optimizer (``parallel``: where its state lives), scheduler and EMA teacher state
    and the run's summary so far; returns ``(start step, wall seconds of the earlier segments)``
    (``(0, 0.0)`` for a fresh run)."""
    if not resume.active:
        return 0, 0.0
    ckpt = resume.ckpt
    state = resume.trainer_state = load_trainer_state(ckpt)
    check_world_size(ckpt, saved_world_size(state), parallel.world_size)
    start = int(state["step"])
    if start != resume.state["step"]:
        raise CheckpointError(f"{ckpt}: trainer_state.pt is at step {start} but state.json at step {resume.state['step']}")
    parallel.restore_optimizer(ckpt, state, opt, teacher)
    with restoring(ckpt / "trainer_state.pt", "optimizer or scheduler state"):
        if state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
    # a run with an EMA teacher cannot continue without its EMA state (never re-initialised)
    ema = None if parallel.ema_in_shards(teacher) else load_ema(ckpt, required=teacher.has_state)
    if ema is not None:
        with restoring(ckpt / "teacher_ema.safetensors", "EMA teacher state"):
            teacher.load_state_dict(ema)
    summary.update(resume.state.get("summary", {}))
    wall_before = float(summary.pop("wall_seconds", 0.0) or 0.0)  # the segments before this one
    console.print(f"resuming from {ckpt} (step {start})", markup=False, highlight=False)
    return start, wall_before


def seed_sampling(resume: Resume, seed: int, rank: int, world_size: int) -> None:
    """The sampling RNG: on resume exactly the state saved with the checkpoint (each process its
    own stream), else ``seed + rank`` (processes sample different rollouts)."""
    if resume.active:
        with restoring(resume.ckpt / "trainer_state.pt", "RNG state"):
            set_rng_state(rank_rng(resume.trainer_state, rank, world_size))
    else:
        from transformers import set_seed

        set_seed(seed + rank)


def check_resume(cfg: Config, run: Path, ckpt: Path, state: dict, console: Console) -> dict:
    """Before anything is loaded or written: may the run continue from ``ckpt`` with ``cfg``?

    * ``train.steps`` below the checkpoint's step is an error (resuming never rewrites a run's
      history; equal steps: nothing to do, see :func:`finished_summary`);
    * an explicit checkpoint older than checkpoints already in ``<run>/checkpoints`` is an error
      (continuing from it would overwrite them);
    * a config field outside ``checkpoint.RESUME_MUTABLE`` that differs from the checkpoint's
      config is an error listing every such key (old -> new).

    Returns the allowed changes ``{key: (old, new)}``, recorded in ``metrics.jsonl``."""
    start = state["step"]
    if cfg.train.steps < start:
        raise CheckpointError(
            f"--resume: the run is at step {start} ({ckpt}); train.steps={cfg.train.steps} would rewrite its history "
            f"(checkpoints, metrics.jsonl, summary.json). Pass train.steps >= {start} (= {start}: nothing to do)")
    if cfg.train.resume != "latest":
        newer = [p.name for p in checkpoint_dirs(run) if step_of(p) > start]
        if newer:
            raise CheckpointError(
                f"--resume {ckpt}: {run / 'checkpoints'} already holds later checkpoints ({', '.join(newer)}); continuing "
                f"from step {start} would overwrite the run's history. Use --resume latest, another train.output_dir, "
                "or remove the later checkpoints first")
    old = state.get("config")
    if old is None:
        warn(console, f"{ckpt} records no config (written by an older version): changes to the config cannot be checked")
    changes = check_resume_config(ckpt, old, cfg.to_dict(), Config().to_dict())
    if "train.steps" in changes and cfg.train.lr_scheduler in ("linear", "cosine"):
        o, n = changes["train.steps"]
        raise CheckpointError(
            f"--resume {ckpt}: train.lr_scheduler={cfg.train.lr_scheduler} decays over train.steps, so changing it "
            f"({o} -> {n}) would change the schedule mid-run (the steps taken followed the old one); resume with "
            f"train.steps={o}, or start a new run (another train.output_dir)")
    return changes


def check_initial_weights(ckpt: Path, state: dict, init_weights: dict) -> None:
    """The initial weights (warm start / model files) must be those the run started from: the
    frozen teacher is θ₀, and the LoRA base is θ₀."""
    old = state.get("init_weights") or {}
    if old.get("sha256") and old["sha256"] != init_weights["sha256"]:
        src = init_weights.get("warm_start") or init_weights.get("name", "")
        raise CheckpointError(
            f"--resume {ckpt}: the initial weights differ from those the run started from (sha256 {old['sha256'][:16]} "
            f"then, {init_weights['sha256'][:16]} now; {src}): the warm start or the model files changed. Restore them "
            "or start a new run in another train.output_dir")


def check_world_size(ckpt: Path, saved: int | None, now: int) -> None:
    """A run continues exactly only with the number of processes it was saved with: each process
    samples its own share of a step's prompts from its own RNG stream."""
    if saved is not None and saved != now:
        raise CheckpointError(
            f"--resume {ckpt}: the run was saved by {saved} process(es), this launch has {now}; each process samples its "
            f"own share of a step's prompts from its own RNG stream, so another number would continue on another "
            f"trajectory. Launch {saved} process(es), or start a new run (another train.output_dir)")


def finished_summary(run: Path, start: int, cfg: Config) -> dict | None:
    """The run's ``summary.json`` when it already finished at ``train.steps == start``, else None."""
    if start != cfg.train.steps or not (run / "summary.json").is_file():
        return None
    try:
        summ = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summ if isinstance(summ, dict) and summ.get("steps") == start and "output_dir" in summ else None
