"""The training loop: rollouts → rewards → algorithm loss terms → optimizer step → logs/checkpoints.

``train`` reads top to bottom like method.md §3: per step, (1) the step's prompts, (2) G rollouts
per prompt from the student on token ids, (3) verified outcomes, (4–6) the algorithm's plan and
loss terms with gradient accumulation, then one optimizer step, the teacher update, metrics and
checkpoints. Runs resume exactly from a checkpoint (``train.resume``); a resume that could not be
exact (fewer steps than done, changed settings, other initial weights, missing or corrupt state) is
refused with a one-line :class:`~ogls_sd.checkpoint.CheckpointError` (see :func:`check_resume`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .algorithms import Group, Rollout, StepBatch, build_algorithm, teacher_kind
from .registry import ALGORITHMS
from .checkpoint import (SHARDED, CheckpointError, check_resume_config, checkpoint_dirs, load_ema, load_model_weights,
                         load_trainer_state, rank_rng, read_state, resolve_resume, restoring, rng_state, save_checkpoint,
                         saved_world_size, set_rng_state, step_of, weights_fingerprint)
from .config import Config, ConfigError
from .distributed import (barrier, gather_objects, globalize_plan, rank_slice, sum_across_ranks, sum_dicts, sum_gradients,
                          world)
from .accuracy import check_eval_prompts, check_prompt_fits, context_limit, evaluate_accuracy
from .markers import loop_fraction, marker_metrics
from .models import load_policy
from .rewards.functions import RewardError, RewardSet, RewardSpec, resolve
from .runlock import check_fresh_run_dir, clear_previous_run, holding_run_lock
from .sharding import clip_grad_norm, is_sharded
from .rollout import SamplingParams, build_backend
from .teacher import Teacher
from .templates import PromptBuilder


class TrainingHalted(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps) after saving a checkpoint."""


class NonFiniteWeights(RuntimeError):
    """An optimizer step left a weight non-finite (inf / NaN): the run stops before saving anything."""


def weights_finite(params: list) -> bool:
    """Every trainable weight is finite (FSDP2: each process checks its own shards, and the
    answer is agreed across processes)."""
    local = [p.detach().to_local() if is_sharded(p) else p.detach() for p in params]
    ok = bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True
    return sum_across_ranks([0.0 if ok else 1.0])[0] == 0.0


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False,
    )


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Stands in for the rich progress display when stdout is not a terminal (log files, SLURM,
    ``nohup``): a task prints one line when it starts; the warm start's periodic check lines (printed
    through ``.console``) report its progress; nothing is redrawn."""

    def __init__(self, console: Console):
        self.console = console

    def add_task(self, description: str, total: int | None = None, **_) -> int:
        self.console.print(f"{description}: up to {total} steps" if total else description, markup=False, highlight=False)
        return 0

    def update(self, *args, **kwargs) -> None:
        pass


class StepLines:
    """The training progress when stdout is not a terminal (a log file, CI, ``nohup``): one plain
    line per step instead of a redrawn bar, e.g.
    ``step 3/40  reward 0.125  loss 0.0123  kl 0.0040  tok/s 812  eta 0:01:23`` (and ``held-out acc
    0.640`` on the steps of an ``eval.every`` measurement)."""

    def __init__(self, console: Console, total: int, start: int):
        self.console, self.total, self.start, self.t0 = console, total, start, time.time()

    def step(self, rec: dict) -> None:
        done = rec["step"] - self.start
        eta = (time.time() - self.t0) / max(1, done) * (self.total - rec["step"])
        parts = [f"step {rec['step']}/{self.total}"]
        if "reward/mean" in rec:
            parts.append(f"reward {rec['reward/mean']:.3f}")
        parts.append(f"loss {rec['loss']:.4f}")
        if "kl/token" in rec:  # algorithms with a distillation term
            parts.append(f"kl {rec['kl/token']:.4f}")
        if "throughput/rollout_tok_s" in rec:
            parts.append(f"tok/s {rec['throughput/rollout_tok_s']:.0f}")
        if "eval/accuracy" in rec:  # the eval.every measurement reaches the log, not only metrics.jsonl
            parts.append(f"held-out acc {rec['eval/accuracy']:.3f}")
        parts.append(f"eta {_clock(eta)}")
        self.console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)


class MetricsLog:
    """Per-step metrics as JSON lines in ``<run>/metrics.jsonl``, also routed to ``tracker``
    (``train.report_to``, see ``tracking.py``). On resume, records after the checkpoint's step
    are dropped first, so the log reads as if the run had never stopped."""

    def __init__(self, path: Path, tracker=None, keep_until_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:  # data parallel: only rank 0 writes
            self.f, self.tracker = None, None
            return
        if keep_until_step is not None and path.is_file():
            kept = [ln for ln in _text_lines(path) if _parse_step(ln) is not None and _parse_step(ln) <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif keep_until_step is None and path.is_file():
            path.unlink()  # a fresh run in an existing directory starts a fresh log
        self.f = open(path, "a", buffering=1)
        self.tracker = tracker

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        try:
            self.f.write(json.dumps(rec, sort_keys=True) + "\n")
        except OSError as e:  # a full disk: name the file
            raise OSError(e.errno, f"appending to {self.path}: {e.strerror or e}") from None
        if self.tracker is not None:
            self.tracker.log(rec, step=rec.get("step"))

    def close(self) -> None:
        if not self.enabled:
            return
        self.f.close()
        if self.tracker is not None:
            self.tracker.close()


def _text_lines(path: Path) -> list[str]:
    """The UTF-8 lines of ``path``; a line that is not UTF-8 (damage) is dropped like a cut one."""
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if line.strip():
            out.append(line)
    return out


def _parse_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill is dropped


def _p90(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)])


@dataclass
class Optimized:
    """What one optimizer step reports: summed loss terms, grad norm, and whether it was skipped."""

    agg: dict
    grad_norm: float
    skipped: bool


def build_scheduler(cfg: Config, opt):
    """``train.lr_scheduler``: ``constant`` is linear warm-up reaching ``train.lr`` at step
    ``warmup_steps`` then constant (the schedule before the option existed); the others are
    transformers' ``get_scheduler`` over ``train.steps``."""
    t = cfg.train
    if t.lr_scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, t.warmup_steps)))
    from transformers import get_scheduler

    return get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)


NOOP_WARN_AFTER = 3  # consecutive no-op steps before the console warning


def is_noop(res: "Optimized") -> bool:
    """A step that changed nothing although it was not skipped: no loss term at all (no
    distillation target, no tail, no non-zero advantage) or an exactly zero gradient."""
    return not res.skipped and res.grad_norm == 0.0


def noop_cause(cfg: Config, metrics: dict) -> str:
    """Why a step had no loss term, with the knobs that change it (one line)."""
    algo = cfg.train.algorithm
    if metrics.get("groups/all_incorrect", 0.0) >= 1.0 and metrics.get("no_positive/skip", 0.0) > 0:
        why = "every group was all-incorrect and steering.no_positive=skip drops such groups"
        knobs = "set steering.no_positive=reference|opsd, raise rollout.num_generations, or use an easier task"
    elif metrics.get("groups/all_correct", 0.0) >= 1.0:
        why = "every group was all-correct (nothing to distil; no short correct rollout for the tail)"
        knobs = "use a harder task, raise rollout.max_new_tokens or set steering.distill_on=all"
    elif metrics.get("targets_zero_grad", 0.0) > 0 and not metrics.get("tail_rollouts", 0.0):
        why = ("steering.strength=0 with a live anchor makes every target the student itself (zero gradient, "
               "not distilled), and no short correct rollout gave a tail term")
        knobs = "set steering.strength > 0, teacher.kind=frozen|ema, or raise rollout.num_generations"
    elif metrics.get("grpo/zero_spread_frac", 0.0) >= 1.0:
        why = "every group's rollouts had the same reward, so every advantage was 0"
        knobs = "raise rollout.num_generations or rollout.temperature, or use an easier (or harder) task"
    else:
        why = f"train.algorithm={algo} produced no loss term (no distillation target, no tail, zero gradient)"
        knobs = ALGORITHMS[algo].noop_hint
    return f"{why}; {knobs}"


def collect_rollouts(cfg: Config, task, tok, prompts: PromptBuilder, backend, sampling, algo, step: int,
                     rewards: RewardSet | None = None, limit: int | None = None) -> StepBatch:
    """Steps 1–3 of method.md §3: the step's prompts, G rollouts each, their rewards (``rewards``:
    the run's reward functions; default the task's verifier) and pools (``reward.success_threshold``);
    every prompt plus ``rollout.max_new_tokens`` must fit the model's context ``limit`` (None: unchecked)."""
    G = cfg.rollout.num_generations
    # 1. prompts of this step: a function of (seed, step) only, so a resumed run sees the same ones
    # With several processes each rank takes a contiguous share of whole prompt groups.
    exs = task.examples(cfg.train.prompts_per_step, seed=cfg.data.seed * 1_000_003 + step, split="train")
    exs = exs[rank_slice(len(exs))]
    groups = [Group(ex, prompts.student_ids(ex), prompts.teacher_ids(ex)) for ex in exs]
    check_context(groups, cfg.rollout.max_new_tokens, limit)
    # 2. G rollouts per prompt from the student, on token ids (none for SFT)
    if not algo.needs_rollouts:
        return StepBatch(groups, [])
    comps = backend.generate([g.student_prompt for g in groups for _ in range(G)], sampling)
    # 3. outcomes r_i (the reward functions; the same ones held-out accuracy uses)
    rewards = rewards if rewards is not None else RewardSet([], task, cfg.reward.success_threshold)
    texts = [tok.decode(c.ids, skip_special_tokens=True) for c in comps]
    shown = [tok.decode(g.student_prompt, skip_special_tokens=False) for g in groups]
    scores = agreed(lambda: rewards.score([shown[k // G] for k in range(len(comps))], texts,
                                          [groups[k // G].example for k in range(len(comps))]))
    rollouts = []
    for k, (c, r) in enumerate(zip(comps, scores)):
        rollouts.append(Rollout(k // G, c.ids, c.finished, r, rewards.threshold))
        groups[k // G].rollouts.append(k)
    return StepBatch(groups, rollouts)


def agreed(score):
    """``score()``, where a :class:`RewardError` in any process raises in every process (they must
    stop together: the others would wait for it in the next collective operation)."""
    failure, out = None, None
    try:
        out = score()
    except RewardError as e:
        failure = e
    if sum_across_ranks([1.0 if failure else 0.0])[0]:
        raise failure or RewardError("a reward function failed in another process (its error is in that process's output)")
    return out


def reward_parts(means: dict[str, float], n: int) -> dict[str, float]:
    """``reward/fn/<name>``: each reward function's unweighted mean over the step's rollouts (all
    processes' when there are several; every process calls this once per step)."""
    if not means:
        return {}
    totals = sum_across_ranks([m * n for m in means.values()] + [float(n)])
    return {f"reward/fn/{k}": t / max(1.0, totals[-1]) for k, t in zip(means, totals)}


def check_context(groups: list[Group], max_new_tokens: int, limit: int | None) -> None:
    """A prompt (student or privileged teacher) plus the generation limit must fit the model's
    context: raise a clear error naming the example instead of silently truncating (anchors.md #5)."""
    for g in groups:  # the same rule as held-out accuracy and ogls-sd eval (evaluate.check_prompt_fits)
        for kind, ids in (("student", g.student_prompt), ("teacher", g.teacher_prompt)):
            check_prompt_fits(g.example, kind, len(ids), max_new_tokens, limit)


def optimize(cfg: Config, algo, plan, accel, policy, params, opt, teacher, shard=None) -> Optimized:
    """Steps 4–6: loss terms over micro-batches (gradient accumulation), clip, optimizer step,
    teacher update. ``inner_steps > 1`` (GRPO's PPO epochs) repeats this on the same plan; the
    reported terms and grad norm are then means. A non-finite loss or gradient skips the update.

    ``shard`` (FSDP2, :class:`~ogls_sd.sharding.Sharding`): the parameters are gathered for the
    micro-batches, the gradients reduce-scattered into the shards, and the optimizer steps on the
    shards (the step's other passes, rollouts and plan, ran gathered as well)."""
    agg: dict[str, float] = {}
    policy.train()
    inner = max(1, getattr(algo, "inner_steps", 1))
    gns, skipped = [], False
    replicated = [p for p in params if not is_sharded(p)]  # data parallel: summed explicitly
    for _ in range(inner):
        if shard is not None:
            shard.gather()
        finite = True
        for micro in plan.micro_batches(cfg.train.micro_batch_size):
            with accel.autocast():  # train.mixed_precision (the model is not wrapped by accelerate)
                loss, m = algo.loss(plan, micro)
            if not torch.isfinite(loss.detach()):
                finite = False
                break
            accel.backward(loss)
            agg["loss"] = agg.get("loss", 0.0) + float(loss.detach())
            for k, v in m.items():
                agg[k] = agg.get(k, 0.0) + v
        # data parallel: every rank must take part in the reduction, finite or not
        finite = sum_across_ranks([0.0 if finite else 1.0])[0] == 0.0
        if shard is not None:  # FSDP2: every rank reduce-scatters (also a step about to be skipped)
            shard.reduce_gradients()
            shard.release()
        if finite:
            sum_gradients(replicated)
            if shard is not None:
                gn = clip_grad_norm(params, cfg.train.max_grad_norm)
            elif cfg.train.max_grad_norm > 0:
                gn = float(accel.clip_grad_norm_(params, cfg.train.max_grad_norm))
            else:
                gn = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.detach().norm() for p in params if p.grad is not None] or [torch.zeros(())])))
            finite = math.isfinite(gn)
        if not finite:
            opt.zero_grad(set_to_none=True)
            skipped = True
            break
        gns.append(gn)
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update()
    if inner > 1:
        agg = {k: v / inner for k, v in agg.items()}
    agg = sum_dicts(agg)  # data parallel: every term is a sum, so the step's terms are the ranks' sums
    return Optimized(agg, sum(gns) / len(gns) if gns else float("nan"), skipped)


def step_record(step: int, batch: StepBatch, plan, res: Optimized, lr: float, t: dict, tok, task, cfg: Config, algo) -> dict:
    """The metrics of method.md §6 for one step (definitions in docs/metrics.md)."""
    agg, rollouts = res.agg, batch.rollouts
    lens = [len(r.ids) for r in rollouts] or [0]
    n_roll = max(1, len(rollouts))

    rec = {
        "step": step + 1,
        "reward/mean": sum(r.reward for r in rollouts) / n_roll,
        **plan.metrics,
        "loss": agg.get("loss", 0.0),
        "completion/len_mean": sum(lens) / len(lens),
        "completion/len_p90": _p90(lens),
        "completion/truncated": sum(not r.finished for r in rollouts) / n_roll,
        "completion/eos": sum(r.finished for r in rollouts) / n_roll,
        "completion/loop_frac": loop_fraction(rollouts),
        "grad_norm": res.grad_norm if math.isfinite(res.grad_norm) else None,
        "nonfinite/skipped": float(res.skipped),
        "step/noop": float(is_noop(res)),
        "lr": lr,
        "time/rollout_s": t["rollout"],
        "time/train_s": t["train"],
        "time/step_s": t["step"],
        "throughput/rollout_tok_s": sum(lens) / max(t["rollout"], 1e-9),
        "tokens/rollout": float(sum(len(r.ids) for r in rollouts)),
        **marker_metrics([tok.decode(r.ids, skip_special_tokens=True) for r in rollouts],
                         getattr(task, "template_marker", None), cfg.train.reflection_markers),
        **algo.step_metrics(agg),
    }
    if not rollouts:  # SFT: nothing was generated; no rollout statistics
        for k in ("reward/mean", "completion/len_mean", "completion/len_p90", "completion/truncated",
                  "completion/eos", "completion/loop_frac", "throughput/rollout_tok_s"):
            rec.pop(k)
    return rec


def completions_record(step: int, batch: StepBatch, tok, n_prompts: int) -> dict:
    """``train.log_completions``: the first ``n_prompts`` prompts of a step (this process's share)
    with their rollouts, rewards and pools, as one JSON record."""
    groups = []
    for g in batch.groups[:n_prompts]:
        rolls = [batch.rollouts[i] for i in g.rollouts]
        groups.append({
            "prompt": tok.decode(g.student_prompt, skip_special_tokens=False),
            "answer": g.example.answer,
            "rollouts": [{"text": tok.decode(r.ids, skip_special_tokens=True), "reward": r.reward,
                          "pool": "P" if r.correct else "N", "tokens": len(r.ids), "finished": r.finished} for r in rolls],
        })
    return {"step": step, "groups": groups}


def completions_markdown(rec: dict) -> str:
    """The record as Markdown (TensorBoard text)."""
    out = []
    for g in rec["groups"]:
        out.append(f"**prompt** (answer `{g['answer']}`):\n\n    " + g["prompt"].replace("\n", "\n    "))
        for k, r in enumerate(g["rollouts"]):
            out.append(f"{k}. reward {r['reward']:g} ({r['pool']}, {r['tokens']} tokens"
                       f"{'' if r['finished'] else ', truncated'}):\n\n    " + r["text"].replace("\n", "\n    "))
    return "\n\n".join(out)


def harness_eval(cfg: Config, policy, tok, task, task_tpl, info: dict, out: Path, console: Console) -> None:
    """``eval.benchmarks`` during training: the files of ``ogls-sd eval`` for this step, under the
    eval seed; the training RNG state is restored afterwards, so the run's rollouts do not change."""
    from .eval_harness import BenchmarkSpec, evaluate_benchmarks

    saved = rng_state()
    try:
        evaluate_benchmarks(cfg, policy, tok, task, task_tpl, [BenchmarkSpec.parse(b) for b in cfg.eval.benchmarks],
                            cfg.eval.k, cfg.eval.seed, out, info, console=console)
    finally:
        set_rng_state(saved)
        policy.train()


def _accelerate_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config (configs/accelerate/fsdp.yaml) sets this."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _warn(console: Console, msg: str) -> None:
    # several processes: one reports (before the process group exists, the launcher's RANK says which)
    rank = world()[0] if world()[1] > 1 else int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # one line


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
        _warn(console, f"{ckpt} records no config (written by an older version): changes to the config cannot be checked")
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


def torch_threads(cfg: Config, env) -> int | None:
    """``train.threads``, or by rule when 0: OMP_NUM_THREADS when set (torch reads it itself: None),
    1 for the built-in tiny model, else None (torch's default)."""
    if cfg.train.threads:
        return cfg.train.threads
    if env.get("OMP_NUM_THREADS"):
        return None
    return 1 if cfg.model.name == "tiny" else None


def reward_specs(cfg: Config, extra=()) -> list[RewardSpec]:
    """``reward.funcs`` and the Python API's ``rewards``, imported: a module that does not import is
    a :class:`ConfigError` naming the entry, before any data or model is loaded."""
    try:
        return resolve(cfg.reward.funcs, extra)
    except RewardError as e:
        raise ConfigError(str(e)) from None


@holding_run_lock  # one run per output directory (<output_dir>/.lock); before anything in it is touched
def train(cfg: Config, console: Console | None = None, overwrite: bool = False, *, model=None, tokenizer=None, task=None,
          rewards=()) -> dict:
    """Run training as configured; returns the summary (also written to ``summary.json``).

    A fresh run in a directory that holds another run is refused unless ``overwrite`` (then the
    old run's files are removed once every check of the new run has passed).

    The Python API (:mod:`ogls_sd.api`) passes what a config cannot hold: ``model`` / ``tokenizer``
    objects, the training data as a ``task``, and reward functions as callables (``rewards``: after
    ``reward.funcs``; see :func:`~ogls_sd.rewards.functions.resolve`)."""
    from accelerate import Accelerator
    from transformers import set_seed

    from .tracking import check_tracker

    if console is None:  # off a terminal (a log file, nohup) long lines stay whole instead of wrapping at 80 columns
        console = Console()
        console.soft_wrap = not console.is_terminal
    specs = reward_specs(cfg, rewards)  # the user's reward modules import, or one line before anything loads
    check_tracker(cfg.train.report_to)  # a missing optional tracker: one line, before any model is loaded
    if cfg.train.push_to_hub:  # the hub, likewise: never train for hours and then fail to upload
        from .hub import check_hub

        check_hub(cfg.train.push_to_hub)
    t_start = time.time()
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    resume_from = resolve_resume(run, cfg.train.resume, warn=lambda msg: _warn(console, msg))
    resume_state: dict = {}
    resume_changes: dict = {}
    if resume_from is not None:
        resume_state = read_state(resume_from)
        resume_changes = check_resume(cfg, run, resume_from, resume_state, console)
        finished = finished_summary(run, resume_state["step"], cfg)
        if finished is not None:  # a finished run resumed with train.steps = its steps: nothing to do
            console.print(f"the run already reached train.steps={cfg.train.steps} ({resume_from}): nothing to do",
                          markup=False, highlight=False)
            return finished
    old_run = [] if resume_from is not None else check_fresh_run_dir(run, overwrite, restart_unsaved=bool(cfg.train.resume))
    threads = torch_threads(cfg, os.environ)
    if threads:
        torch.set_num_threads(threads)
    set_seed(cfg.train.seed)
    # device=auto without a GPU is CPU: say so, or accelerate would not join the processes of
    # a multi-process CPU launch into one group (each would think it is rank 0).
    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if "WORLD_SIZE" not in os.environ:  # one process: a second train() in it may use other accelerate settings
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    fsdp = cfg.train.fsdp or _accelerate_fsdp()
    # FSDP2: train.mixed_precision becomes the sharding's policy (accelerate's autocast stays off)
    accel = Accelerator(cpu=cpu, mixed_precision="no" if fsdp else cfg.train.mixed_precision)
    fsdp = fsdp or accel.distributed_type.name == "FSDP"
    if accel.distributed_type.name == "DEEPSPEED":
        raise NotImplementedError(
            "DEEPSPEED is not supported by the trainer: use configs/accelerate/fsdp.yaml (FSDP2 sharding, "
            "docs/scaling.md) or configs/accelerate/ddp.yaml (data parallel; LoRA if the model does not fit one GPU)")
    if world()[1] != accel.num_processes:
        raise RuntimeError(f"accelerate sees {accel.num_processes} process(es) but torch.distributed has {world()[1]}; "
                           "launch with `accelerate launch` or `torchrun` and train.device set explicitly")
    if fsdp and world()[1] < 2:
        raise ValueError("train.fsdp=true shards across processes: launch several (accelerate launch --config_file "
                         "configs/accelerate/fsdp.yaml, or torchrun --nproc_per_node N); with one process leave it off")
    if resume_from is not None:  # before anything is loaded: the recorded number of processes, if any
        check_world_size(resume_from, resume_state.get("world_size"), world()[1])
    if not accel.is_main_process:  # data parallel: one rank reports (errors still raise on every rank)
        console = Console(quiet=True)

    # ---- policy, teacher (θ₀ is taken before any checkpoint is loaded), algorithm, optimizer
    # One process per machine first: it computes and caches the warm start; the others then load it.
    with accel.local_main_process_first(), (_progress(console) if console.is_terminal
                                             else contextlib.nullcontext(PlainProgress(console))) as progress:
        policy, tok, task, task_tpl, info = load_policy(cfg, progress, task=task, model=model, tokenizer=tokenizer)
    reward_set = RewardSet(specs, task, cfg.reward.success_threshold)
    # the initial weights θ₀ (warm start / model files) are part of what a checkpoint continues
    init_weights = {"sha256": weights_fingerprint(policy), **{k: info[k] for k in ("name", "warm_start") if k in info}}
    if resume_from is not None:
        check_initial_weights(resume_from, resume_state, init_weights)
    policy.to(accel.device)
    prompts = PromptBuilder(tok, cfg.templates, task_tpl)
    # algorithms that never read the teacher (SFT, RFT, GRPO without KL) get no teacher copy
    teacher = Teacher(policy, teacher_kind(cfg), cfg.teacher.ema_decay, lora=cfg.model.lora)
    if resume_from is not None:  # after the teacher copy (θ₀), before sharding
        load_model_weights(resume_from, policy)
    shard = None
    if fsdp:  # FSDP2: the policy and the teacher copy sharded (sharding.py)
        from .sharding import Sharding

        shard = Sharding(policy, teacher.copy, lora=cfg.model.lora, mixed_precision=cfg.train.mixed_precision)
    step_scope = shard.gathered if shard is not None else contextlib.nullcontext  # a step's compute: gathered
    algo = build_algorithm(cfg, policy, teacher, prompts)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = build_scheduler(cfg, opt)

    run_name = cfg.train.run_name or run.resolve().name
    summary: dict = {"algorithm": cfg.train.algorithm, "run_name": run_name, "model": info, "output_dir": str(run),
                     "noop_steps": 0}
    if specs:  # the run's own reward functions (none: the task's verifier, as always)
        summary["reward_funcs"] = [f"{s.label}={s.weight:g}" for s in specs]
    if hasattr(task, "split_line"):  # a file / hub data set: what was held out
        console.print(task.split_line(), markup=False, highlight=False)
        summary["data_split"] = dict(zip(("train", "held_out"), task.split_sizes))
    if getattr(task, "skipped", 0):
        summary["data_skipped"] = task.skipped
        console.print(f"[yellow]data:[/] skipped {task.skipped} bad rows (data.policy=skip)")
    if getattr(task, "duplicates", 0):
        summary["data_duplicates"] = task.duplicates
        console.print(f"[yellow]data:[/] dropped {task.duplicates} rows whose problem repeats an earlier row's "
                      "(the first is kept, so no problem is both trained on and held out)")
    wall_before = 0.0  # wall seconds of the earlier segments of a resumed run
    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        check_world_size(resume_from, saved_world_size(state), world()[1])
        start = int(state["step"])
        if start != resume_state["step"]:
            raise CheckpointError(f"{resume_from}: trainer_state.pt is at step {start} but state.json at step "
                                  f"{resume_state['step']}")
        if shard is not None:  # optimizer (and EMA copy) shards: torch.distributed.checkpoint
            if not (resume_from / SHARDED).is_dir():
                raise CheckpointError(f"{resume_from}: no {SHARDED}/ directory (not written by a train.fsdp run)")
            with restoring(resume_from / SHARDED, "sharded optimizer / EMA teacher state"):
                shard.load_sharded(resume_from / SHARDED, opt, teacher)
        with restoring(resume_from / "trainer_state.pt", "optimizer or scheduler state"):
            if shard is None:
                opt.load_state_dict(state["optimizer"])
            if state.get("scheduler"):
                sched.load_state_dict(state["scheduler"])
        # a run with an EMA teacher cannot continue without its EMA state (never re-initialised)
        sharded_ema = shard is not None and teacher.copy is not None
        ema = None if sharded_ema else load_ema(resume_from, required=teacher.has_state)
        if ema is not None:
            with restoring(resume_from / "teacher_ema.safetensors", "EMA teacher state"):
                teacher.load_state_dict(ema)
        summary.update(resume_state.get("summary", {}))
        wall_before = float(summary.pop("wall_seconds", 0.0) or 0.0)  # the segments before this one
        console.print(f"resuming from {resume_from} (step {start})", markup=False, highlight=False)

    # The model is not wrapped (no DDP): the algorithms call the backbone directly, and gradients
    # are summed across ranks explicitly after the micro-batch loop (distributed.py), or
    # reduce-scattered into the shards (sharding.py).
    if shard is None:
        opt = accel.prepare(opt)
    rank, world_size = world()
    summary["processes"] = world_size
    is_main = rank == 0
    limit = context_limit(policy)  # the model's context: prompts + generation limit must fit it
    backend = build_backend(cfg.rollout, policy, prompts.pad_id, prompts.eos_id, cfg=cfg, is_main_process=accel.is_main_process)
    sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
    heldout = task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test")
    if cfg.eval.before_after or cfg.eval.every:  # before training, on every rank: the whole held-out set fits
        check_eval_prompts(heldout, [prompts.student_ids(ex) for ex in heldout], cfg.eval.max_new_tokens, limit)
    # every check passed: only now is the run directory written (a refused run changes nothing in it)
    if is_main:
        clear_previous_run(run, old_run)  # --overwrite (or a run stopped before its first checkpoint)
        cfg.save(run / "config.yaml")
    from .tracking import open_tracker

    log = MetricsLog(run / "metrics.jsonl", open_tracker(cfg.train.report_to, run, cfg.to_dict(), name=run_name) if is_main else None,
                     keep_until_step=start if resume_from is not None else None, enabled=is_main)
    # train.log_completions (same resume rule as metrics.jsonl: records after the checkpoint dropped)
    samples = MetricsLog(run / "completions.jsonl", None, keep_until_step=start if resume_from is not None else None,
                         enabled=is_main)
    if resume_changes:  # settings changed on resume (only those that keep the run exact): on the record
        log.write({"step": start, "resume/changed": {k: [o, n] for k, (o, n) in resume_changes.items()}})
        console.print("resumed with changed settings: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in resume_changes.items()),
                      highlight=False, markup=False)

    def held_out_accuracy() -> float:
        """Greedy accuracy on the held-out set; with several processes each evaluates every
        world_size-th problem and the counts are summed (one process: the whole set)."""
        share = heldout[rank::world_size]
        with step_scope():
            res = agreed(lambda: evaluate_accuracy(policy, tok, prompts, task, share, cfg.eval.max_new_tokens,
                                                   cfg.eval.batch_size, rewards=reward_set))
        correct, n = sum_across_ranks([float(sum(res.correct)), float(len(share))])
        return correct / max(1.0, n)

    def checkpoint(step: int) -> Path:
        """Every rank calls it: the ranks' RNG states are gathered, and with FSDP2 the full weights
        (to rank 0) and the optimizer / EMA shards (every rank writes its own) too."""
        final = run / "checkpoints" / f"step_{step:06d}"
        rngs = gather_objects(rng_state()) if world_size > 1 else None
        full_sd = shard.full_state_dict() if shard is not None and shard.sharded_trainable else None
        sharded_dir = None
        if shard is not None:
            sharded_dir = run / "checkpoints" / f"step_{step:06d}.sharded.tmp"
            if is_main:
                shutil.rmtree(sharded_dir, ignore_errors=True)
            barrier()
            try:
                shard.save_sharded(sharded_dir, opt, teacher)  # collective: fails on every process together
            except CheckpointError:
                if is_main:  # a full disk keeps nothing half-written
                    shutil.rmtree(sharded_dir, ignore_errors=True)
                raise
            barrier()
        failed: Exception | None = None
        if is_main:
            try:
                final = save_checkpoint(
                    run, step, accel.unwrap_model(policy), tok, opt, sched, teacher, cfg.train.keep_last,
                    extra={"summary": {**{k: v for k, v in summary.items() if k.startswith("accuracy_") or k == "noop_steps"},
                                       "wall_seconds": round(wall_before + time.time() - t_start, 1)},
                           "config": cfg.to_dict(), "init_weights": init_weights, "world_size": world_size},
                    state_dict=full_sd, sharded_dir=sharded_dir, rng_ranks=rngs)
            except Exception as e:  # the other ranks must not wait for a checkpoint that will not come
                failed = e
        if world_size > 1 and sum_across_ranks([1.0 if failed else 0.0])[0]:
            if failed is not None:
                raise failed
            raise CheckpointError(f"rank 0 could not write checkpoint {final} (its error is in rank 0's output)")
        if failed is not None:
            raise failed
        return final

    if cfg.eval.before_after and "accuracy_before" not in summary:
        summary["accuracy_before"] = held_out_accuracy()
        console.print(f"held-out accuracy before training: [bold]{summary['accuracy_before']:.3f}[/] (n={len(heldout)})")
        if cfg.eval.every:  # the accuracy curve starts at step 0
            log.write({"step": 0, "eval/accuracy": summary["accuracy_before"]})
    # Sampling RNG: the same whether or not the warm start above came from the cache; on resume,
    # exactly the state saved with the checkpoint (last: everything above may draw random numbers).
    if resume_from is not None:
        with restoring(resume_from / "trainer_state.pt", "RNG state"):
            set_rng_state(rank_rng(state, rank, world_size))  # each rank its own sampling stream
    else:
        set_seed(cfg.train.seed + rank)  # ranks sample different rollouts
    last_eval: tuple[int, float] | None = None  # (step, accuracy) of the latest eval.every measurement
    nonfinite_run = noop_run = 0

    def halt(done: int, e: RewardError) -> None:
        """A reward function failed: stop with a checkpoint of the last completed step ``done``."""
        log.close()
        samples.close()
        if done > start:
            kept = f"stopped with checkpoint {checkpoint(done)} (step {done})"
        else:
            kept = f"stopped at step {done}, " + (f"nothing trained since {resume_from}" if resume_from is not None
                                                  else "before any step completed")
        raise TrainingHalted(f"{e}; {kept}. Fix the function, then continue with --resume latest") from e

    plain = None if console.is_terminal else StepLines(console, cfg.train.steps, start)  # not a TTY: plain lines
    with (_progress(console) if plain is None else contextlib.nullcontext()) as progress:
        if plain is None:
            bar = progress.add_task(f"{cfg.train.algorithm}", total=cfg.train.steps, completed=start, info="")
        for step in range(start, cfg.train.steps):
            t0 = time.time()
            try:
                with step_scope():  # FSDP2: gathered until optimize() reduce-scatters the gradients
                    with accel.autocast():
                        batch = collect_rollouts(cfg, task, tok, prompts, backend, sampling, algo, step, reward_set, limit)  # 1–3
                    parts = dict(reward_set.last_means) if specs and algo.needs_rollouts else {}  # per reward function
                    t1 = time.time()
                    with accel.autocast():
                        plan = algo.plan(batch, step)  # 4–6
                    globalize_plan(plan)  # loss normalisers of the whole (multi-rank) batch
                    res = optimize(cfg, algo, plan, accel, policy, params, opt, teacher, shard)
            except RewardError as e:  # only the rollouts' rewards raise it: nothing of this step was applied
                halt(step, e)
            if not weights_finite(params):  # e.g. a huge train.lr: never sample from, or save, such weights
                raise NonFiniteWeights(
                    f"step {step + 1}: the optimizer step made weights non-finite (inf/NaN; train.lr={cfg.train.lr}, "
                    f"train.weight_decay={cfg.train.weight_decay}); stopped before saving anything (earlier checkpoints "
                    "are intact). Lower train.lr or train.weight_decay")
            sched.step()
            if not res.skipped:
                backend.sync_weights(policy)  # the rollout engine samples the next step from the new weights
            t2 = time.time()

            rec = step_record(step, batch, plan, res, sched.get_last_lr()[0],
                              {"rollout": t1 - t0, "train": t2 - t1, "step": time.time() - t0}, tok, task, cfg, algo)
            rec.update(reward_parts(parts, len(batch.rollouts)))
            if world_size > 1 and batch.rollouts:  # the reward over all ranks' rollouts
                tot, n = sum_across_ranks([sum(r.reward for r in batch.rollouts), float(len(batch.rollouts))])
                rec["reward/mean"] = tot / n
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.train.steps):
                try:
                    last_eval = (step + 1, held_out_accuracy())
                except RewardError as e:
                    log.write(rec)  # the step itself completed
                    halt(step + 1, e)
                rec["eval/accuracy"] = last_eval[1]
                if cfg.eval.benchmarks:
                    with step_scope():  # FSDP2: every process gathers; process 0 evaluates
                        if is_main:
                            harness_eval(cfg, policy, tok, task, task_tpl, info, run / "eval" / f"step_{step + 1:06d}",
                                         console)
            log.write(rec)
            if is_main and batch.rollouts and cfg.train.log_completions and (step + 1) % cfg.train.log_completions == 0:
                crec = completions_record(step + 1, batch, tok, cfg.train.log_completions_prompts)
                samples.write(crec)
                if log.tracker is not None:
                    log.tracker.text("completions", completions_markdown(crec), step + 1)
            if plain is None:
                progress.update(bar, advance=1, info=f"reward {rec.get('reward/mean', 0.0):.3f}  loss {rec['loss']:.4f}"
                                + (f"  kl {rec['kl/token']:.3f}" if "kl/token" in rec else "")
                                + (f"  held-out acc {last_eval[1]:.3f} (step {last_eval[0]})" if last_eval else ""))
            else:
                plain.step(rec)

            nonfinite_run = nonfinite_run + 1 if res.skipped else 0
            noop_run = noop_run + 1 if rec["step/noop"] else 0
            summary["noop_steps"] += int(rec["step/noop"])
            if noop_run == NOOP_WARN_AFTER:
                _warn(console, f"{noop_run} steps in a row changed nothing (steps {step + 2 - noop_run}-{step + 1}, "
                               f"step/noop in metrics.jsonl): {noop_cause(cfg, rec)}")
            if nonfinite_run >= cfg.train.max_nonfinite_steps:
                log.close()
                samples.close()
                ck = checkpoint(step + 1)
                raise TrainingHalted(f"{nonfinite_run} consecutive steps had a non-finite loss or gradient (last: step "
                                     f"{step + 1}); stopped with checkpoint {ck}. Lower train.lr or check the data.")
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.steps:
                checkpoint(step + 1)
    log.close()
    samples.close()

    if start == cfg.train.steps and resume_from is not None and resume_from.parent.resolve() == (run / "checkpoints").resolve():
        ckpt = resume_from  # nothing was trained after it (a run killed before writing summary.json)
    else:
        ckpt = checkpoint(cfg.train.steps)
    summary["checkpoint"] = str(ckpt)
    summary["steps"] = cfg.train.steps
    if cfg.eval.before_after:
        # greedy decoding: the eval.every measurement after the last step is the same number
        summary["accuracy_after"] = last_eval[1] if last_eval and last_eval[0] == cfg.train.steps else held_out_accuracy()
        console.print(f"held-out accuracy after training:  [bold]{summary['accuracy_after']:.3f}[/] (n={len(heldout)})")
    summary["wall_seconds"] = round(wall_before + time.time() - t_start, 1)  # every segment of a resumed run
    if is_main:
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.train.push_to_hub and is_main:  # after summary.json: a failed upload loses nothing
        from .hub import push_checkpoint

        summary["pushed_to"] = push_checkpoint(ckpt, cfg.train.push_to_hub, private=cfg.train.hub_private)
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
        console.print(f"pushed {ckpt / 'model'} to {summary['pushed_to']}", markup=False, highlight=False)
    console.print(f"run directory: {run}  (summary.json, metrics.jsonl, config.yaml, checkpoints/)", markup=False,
                  highlight=False)
    return summary
