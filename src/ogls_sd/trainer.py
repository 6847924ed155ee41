"""The training loop: rollouts → rewards → algorithm loss terms → optimizer step → logs/checkpoints.

``train`` reads top to bottom like method.md §3: set up once, then per step (1) the step's
prompts, (2) G rollouts per prompt from the student on token ids, (3) verified outcomes, (4–6) the
algorithm's plan and loss terms with gradient accumulation, then one optimizer step, the teacher
update, metrics, evaluation and checkpoints. The state between those parts is a :class:`Run`.

What depends on the number of processes (one, data parallel, FSDP2: the step's scope, gradient
reduction and clipping, which process writes, checkpoint parts) is a strategy object from
:mod:`ogls_sd.parallel`. Runs resume exactly from a checkpoint (``train.resume``); the checks that
refuse a resume that could not be exact, and the restore, are :mod:`ogls_sd.resume`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .algorithms import Group, Rollout, StepBatch, build_algorithm, teacher_kind
from .registry import ALGORITHMS
from .checkpoint import load_model_weights, rng_state, save_checkpoint, set_rng_state, weights_fingerprint
from .config import Config, ConfigError
from .distributed import globalize_plan, rank_slice, sum_across_ranks, sum_dicts, world
from .accuracy import check_eval_prompts, check_prompt_fits, context_limit, evaluate_accuracy
from .markers import loop_fraction, marker_metrics
from .models import load_policy
from .rewards.functions import RewardError, RewardSet, RewardSpec, resolve
from .parallel import choose_parallelism, for_sharding, make_accelerator, warn
from .resume import find_resume, restore_training_state, seed_sampling
from .runlock import check_fresh_run_dir, clear_previous_run, holding_run_lock
from .sharding import is_sharded
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


def optimize(cfg: Config, algo, plan, accel, policy, params, opt, teacher, shard=None, parallel=None) -> Optimized:
    """Steps 4–6: loss terms over micro-batches (gradient accumulation), gradient reduction and
    clipping, optimizer step, teacher update. ``inner_steps > 1`` (GRPO's PPO epochs) repeats this
    on the same plan; the reported terms and grad norm are then means. A non-finite loss or
    gradient (on any process) skips the update.

    ``parallel`` (:mod:`ogls_sd.parallel`) decides how the gradients are reduced and clipped; by
    default the strategy around ``shard`` (FSDP2, :class:`~ogls_sd.sharding.Sharding`: the
    parameters gathered for the micro-batches, the gradients reduce-scattered into the shards,
    the optimizer stepping on the shards), or the data-parallel / one-process one."""
    parallel = parallel if parallel is not None else for_sharding(accel, shard)
    agg: dict[str, float] = {}
    policy.train()
    inner = max(1, getattr(algo, "inner_steps", 1))
    gns, skipped = [], False
    for _ in range(inner):
        parallel.begin_pass()
        finite = accumulate_gradients(cfg, algo, plan, accel, agg)
        gn = parallel.reduce_and_clip(params, finite, cfg.train.max_grad_norm)
        if gn is None:  # non-finite here or in another process
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


def accumulate_gradients(cfg: Config, algo, plan, accel, agg: dict[str, float]) -> bool:
    """One pass over the plan's micro-batches: loss, backward, the loss terms summed into ``agg``.
    False (the pass stopped) at the first non-finite loss."""
    for micro in plan.micro_batches(cfg.train.micro_batch_size):
        with accel.autocast():  # train.mixed_precision (the model is not wrapped by accelerate)
            loss, m = algo.loss(plan, micro)
        if not torch.isfinite(loss.detach()):
            return False
        accel.backward(loss)
        agg["loss"] = agg.get("loss", 0.0) + float(loss.detach())
        for k, v in m.items():
            agg[k] = agg.get(k, 0.0) + v
    return True


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
                         task.template_marker, cfg.train.reflection_markers),
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



def preflight(cfg: Config, rewards=()) -> list[RewardSpec]:
    """What can fail before any model is loaded: the reward modules import, the tracker and the
    hub client are installed (never train for hours and then fail to log or upload)."""
    from .tracking import check_tracker

    specs = reward_specs(cfg, rewards)  # the user's reward modules import, or one line before anything loads
    check_tracker(cfg.train.report_to)  # a missing optional tracker: one line, before any model is loaded
    if cfg.train.push_to_hub:
        from .hub import check_hub

        check_hub(cfg.train.push_to_hub)
    return specs


def default_console() -> Console:
    """Off a terminal (a log file, nohup) long lines stay whole instead of wrapping at 80 columns."""
    console = Console()
    console.soft_wrap = not console.is_terminal
    return console


def initial_summary(cfg: Config, run: Path, info: dict, specs: list[RewardSpec], task, console: Console) -> dict:
    """The summary's fields known before the first step (the data split and skipped rows also printed)."""
    summary: dict = {"algorithm": cfg.train.algorithm, "run_name": cfg.train.run_name or run.resolve().name, "model": info,
                     "output_dir": str(run), "noop_steps": 0}
    if specs:  # the run's own reward functions (none: the task's verifier, as always)
        summary["reward_funcs"] = [f"{s.label}={s.weight:g}" for s in specs]
    if task.split_sizes is not None:  # a file / hub data set: what was held out
        console.print(task.describe(), markup=False, highlight=False)
        summary["data_split"] = dict(zip(("train", "held_out"), task.split_sizes))
    if task.skipped:
        summary["data_skipped"] = task.skipped
        console.print(f"[yellow]data:[/] skipped {task.skipped} bad rows (data.policy=skip)")
    if task.duplicates:
        summary["data_duplicates"] = task.duplicates
        console.print(f"[yellow]data:[/] dropped {task.duplicates} rows whose problem repeats an earlier row's "
                      "(the first is kept, so no problem is both trained on and held out)")
    return summary


class Run:
    """One training run between its checks and its summary: what :func:`train` sets up once
    (:meth:`start_processes`, :meth:`load`, :meth:`restore`, :meth:`prepare`, :meth:`begin`), the
    parts of a step (:meth:`collect`, :meth:`plan`, :meth:`optimize`, :meth:`apply`,
    :meth:`record`, :meth:`evaluate`, :meth:`write`, :meth:`watch`) and the end (:meth:`finish`).
    Everything that depends on the number of processes goes through ``self.parallel``
    (:mod:`ogls_sd.parallel`); resuming through ``self.resume`` (:mod:`ogls_sd.resume`)."""

    def __init__(self, cfg: Config, console: Console, specs: list[RewardSpec]):
        self.cfg, self.console, self.specs = cfg, console, specs
        self.t_start = time.time()
        self.dir = Path(cfg.train.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume = find_resume(cfg, self.dir, console)
        self.last_eval: tuple[int, float] | None = None  # (step, accuracy) of the latest eval.every measurement
        self.nonfinite_run = self.noop_run = 0  # consecutive skipped / no-op steps

    # ------------------------------------------------------------------ set-up
    def start_processes(self) -> None:
        """Threads, the seed, the accelerator (and with it the parallelism mode), and the checks
        on the number of processes."""
        from transformers import set_seed

        threads = torch_threads(self.cfg, os.environ)
        if threads:
            torch.set_num_threads(threads)
        set_seed(self.cfg.train.seed)
        self.accel, self.fsdp = make_accelerator(self.cfg)
        self.resume.check_world_size(world()[1])  # before anything is loaded
        if not self.accel.is_main_process:  # data parallel: one rank reports (errors still raise on every rank)
            self.console = Console(quiet=True)

    def load(self, model=None, tokenizer=None, task=None) -> None:
        """Policy, teacher (θ₀ is taken before any checkpoint is loaded), parallelism, algorithm, optimizer."""
        cfg, accel = self.cfg, self.accel
        # One process per machine first: it computes and caches the warm start; the others then load it.
        with accel.local_main_process_first(), (_progress(self.console) if self.console.is_terminal
                                                 else contextlib.nullcontext(PlainProgress(self.console))) as progress:
            self.policy, self.tok, self.task, self.task_tpl, self.info = load_policy(
                cfg, progress, task=task, model=model, tokenizer=tokenizer)
        self.reward_set = RewardSet(self.specs, self.task, cfg.reward.success_threshold)
        # the initial weights θ₀ (warm start / model files) are part of what a checkpoint continues
        self.init_weights = {"sha256": weights_fingerprint(self.policy),
                             **{k: self.info[k] for k in ("name", "warm_start") if k in self.info}}
        self.resume.check_initial_weights(self.init_weights)
        self.policy.to(accel.device)
        self.prompts = PromptBuilder(self.tok, cfg.templates, self.task_tpl)
        # algorithms that never read the teacher (SFT, RFT, GRPO without KL) get no teacher copy
        self.teacher = Teacher(self.policy, teacher_kind(cfg), cfg.teacher.resolve_ema_decay(cfg.train.algorithm), lora=cfg.model.lora)
        if self.resume.active:  # after the teacher copy (θ₀), before sharding
            load_model_weights(self.resume.ckpt, self.policy)
        self.parallel = choose_parallelism(accel, self.fsdp, self.policy, self.teacher, cfg)  # FSDP2: shards here
        self.algo = build_algorithm(cfg, self.policy, self.teacher, self.prompts)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.sched = build_scheduler(cfg, self.opt)

    def restore(self) -> None:
        """The summary so far and, on resume, the optimizer / scheduler / EMA state."""
        self.summary = initial_summary(self.cfg, self.dir, self.info, self.specs, self.task, self.console)
        self.start, self.wall_before = restore_training_state(self.resume, self.parallel, self.opt, self.sched,
                                                              self.teacher, self.summary, self.console)
        self.opt = self.parallel.prepare_optimizer(self.opt)
        self.summary["processes"] = self.parallel.world_size

    def prepare(self, old_run: list) -> None:
        """The rollout engine and the held-out set; then, every check passed, the run directory."""
        cfg, prompts = self.cfg, self.prompts
        self.limit = context_limit(self.policy)  # the model's context: prompts + generation limit must fit it
        self.backend = build_backend(cfg.rollout, self.policy, prompts.pad_id, prompts.eos_id, cfg=cfg,
                                     is_main_process=self.accel.is_main_process)
        self.sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                       cfg.rollout.top_k)
        self.heldout = self.task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test")
        if cfg.eval.before_after or cfg.eval.every:  # before training, on every rank: the whole held-out set fits
            check_eval_prompts(self.heldout, [prompts.student_ids(ex) for ex in self.heldout], cfg.eval.max_new_tokens,
                               self.limit)
        # every check passed: only now is the run directory written (a refused run changes nothing in it)
        if self.parallel.is_main:
            clear_previous_run(self.dir, old_run)  # --overwrite (or a run stopped before its first checkpoint)
            cfg.save(self.dir / "config.yaml")
        self.open_logs()

    def open_logs(self) -> None:
        """``metrics.jsonl`` (and the tracker) and ``completions.jsonl``; on resume the records
        after the checkpoint are dropped, and allowed config changes are put on the record."""
        from .tracking import open_tracker

        cfg, is_main = self.cfg, self.parallel.is_main
        keep = self.start if self.resume.active else None
        tracker = open_tracker(cfg.train.report_to, self.dir, cfg.to_dict(), name=self.summary["run_name"]) if is_main else None
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", tracker, keep_until_step=keep, enabled=is_main)
        self.samples = MetricsLog(self.dir / "completions.jsonl", None, keep_until_step=keep, enabled=is_main)
        changes = self.resume.changes
        if changes:  # settings changed on resume (only those that keep the run exact): on the record
            self.metrics.write({"step": self.start, "resume/changed": {k: [o, n] for k, (o, n) in changes.items()}})
            self.console.print("resumed with changed settings: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in
                                                                             changes.items()), highlight=False, markup=False)

    def begin(self) -> None:
        """The accuracy before training, then the sampling RNG (last: everything above may draw
        random numbers; the same whether or not the warm start came from the cache)."""
        if self.cfg.eval.before_after and "accuracy_before" not in self.summary:
            self.summary["accuracy_before"] = self.held_out_accuracy()
            self.console.print(f"held-out accuracy before training: [bold]{self.summary['accuracy_before']:.3f}[/] "
                               f"(n={len(self.heldout)})")
            if self.cfg.eval.every:  # the accuracy curve starts at step 0
                self.metrics.write({"step": 0, "eval/accuracy": self.summary["accuracy_before"]})
        seed_sampling(self.resume, self.cfg.train.seed, self.parallel.rank, self.parallel.world_size)

    # ------------------------------------------------------------------ one step
    def collect(self, step: int) -> tuple[StepBatch, dict]:
        """Steps 1–3: prompts, rollouts, rewards; and each reward function's mean (``reward.funcs``)."""
        with self.accel.autocast():
            batch = collect_rollouts(self.cfg, self.task, self.tok, self.prompts, self.backend, self.sampling, self.algo,
                                     step, self.reward_set, self.limit)
        return batch, dict(self.reward_set.last_means) if self.specs and self.algo.needs_rollouts else {}

    def plan(self, batch: StepBatch, step: int):
        """Steps 4–6: the algorithm's plan, its loss normalisers summed over the processes."""
        with self.accel.autocast():
            plan = self.algo.plan(batch, step)
        globalize_plan(plan)  # loss normalisers of the whole (multi-rank) batch
        return plan

    def optimize(self, plan) -> Optimized:
        """Loss terms, gradient reduction and clipping, the optimizer step and the teacher update."""
        return optimize(self.cfg, self.algo, plan, self.accel, self.policy, self.params, self.opt, self.teacher,
                        parallel=self.parallel)

    def apply(self, step: int, res: Optimized) -> None:
        """After the optimizer step: refuse non-finite weights, advance the schedule, hand the new
        weights to the rollout engine (it samples the next step from them)."""
        if not weights_finite(self.params):  # e.g. a huge train.lr: never sample from, or save, such weights
            raise NonFiniteWeights(
                f"step {step + 1}: the optimizer step made weights non-finite (inf/NaN; train.lr={self.cfg.train.lr}, "
                f"train.weight_decay={self.cfg.train.weight_decay}); stopped before saving anything (earlier checkpoints "
                "are intact). Lower train.lr or train.weight_decay")
        with warnings.catch_warnings():
            if res.skipped:  # a skipped step still advances the schedule (it counts steps); torch would call
                # that "lr_scheduler.step() before optimizer.step()" when no optimizer step has run yet
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.sched.step()
        if not res.skipped:
            self.backend.sync_weights(self.policy)

    def record(self, step: int, batch: StepBatch, plan, res: Optimized, parts: dict, t: dict) -> dict:
        """The step's metrics (docs/metrics.md); the reward over every process's rollouts."""
        rec = step_record(step, batch, plan, res, self.sched.get_last_lr()[0], t, self.tok, self.task, self.cfg, self.algo)
        rec.update(reward_parts(parts, len(batch.rollouts)))
        if self.parallel.world_size > 1 and batch.rollouts:
            tot, n = sum_across_ranks([sum(r.reward for r in batch.rollouts), float(len(batch.rollouts))])
            rec["reward/mean"] = tot / n
        return rec

    def evaluate(self, step: int, rec: dict) -> None:
        """``eval.every``: held-out accuracy into ``rec`` (and ``eval.benchmarks``, process 0)."""
        cfg = self.cfg
        if not (cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.train.steps)):
            return
        try:
            self.last_eval = (step + 1, self.held_out_accuracy())
        except RewardError as e:
            self.metrics.write(rec)  # the step itself completed
            self.halt(step + 1, e)
        rec["eval/accuracy"] = self.last_eval[1]
        if cfg.eval.benchmarks:
            with self.parallel.step_scope():  # FSDP2: every process gathers; process 0 evaluates
                if self.parallel.is_main:
                    harness_eval(cfg, self.policy, self.tok, self.task, self.task_tpl, self.info,
                                 self.dir / "eval" / f"step_{step + 1:06d}", self.console)

    def write(self, step: int, batch: StepBatch, rec: dict) -> None:
        """``metrics.jsonl`` and, every ``train.log_completions`` steps, ``completions.jsonl``."""
        self.metrics.write(rec)
        n = self.cfg.train.log_completions
        if self.parallel.is_main and batch.rollouts and n and (step + 1) % n == 0:
            crec = completions_record(step + 1, batch, self.tok, self.cfg.train.log_completions_prompts)
            self.samples.write(crec)
            if self.metrics.tracker is not None:
                self.metrics.tracker.text("completions", completions_markdown(crec), step + 1)

    def watch(self, step: int, res: Optimized, rec: dict) -> None:
        """Warn after ``NOOP_WARN_AFTER`` no-op steps in a row; stop (with a checkpoint) after
        ``train.max_nonfinite_steps`` skipped ones; save every ``train.save_every`` steps."""
        cfg = self.cfg
        self.nonfinite_run = self.nonfinite_run + 1 if res.skipped else 0
        self.noop_run = self.noop_run + 1 if rec["step/noop"] else 0
        self.summary["noop_steps"] += int(rec["step/noop"])
        if self.noop_run == NOOP_WARN_AFTER:
            warn(self.console, f"{self.noop_run} steps in a row changed nothing (steps {step + 2 - self.noop_run}-"
                               f"{step + 1}, step/noop in metrics.jsonl): {noop_cause(cfg, rec)}")
        if self.nonfinite_run >= cfg.train.max_nonfinite_steps:
            self.close_logs()
            ck = self.checkpoint(step + 1)
            raise TrainingHalted(f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (last: step "
                                 f"{step + 1}); stopped with checkpoint {ck}. Lower train.lr or check the data.")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.steps:
            self.checkpoint(step + 1)

    # ------------------------------------------------------------------ shared by the above
    def held_out_accuracy(self) -> float:
        """Greedy accuracy on the held-out set; with several processes each evaluates every
        world_size-th problem and the counts are summed (one process: the whole set)."""
        share = self.heldout[self.parallel.rank::self.parallel.world_size]
        with self.parallel.step_scope():
            res = agreed(lambda: evaluate_accuracy(self.policy, self.tok, self.prompts, self.task, share,
                                                   self.cfg.eval.max_new_tokens, self.cfg.eval.batch_size,
                                                   rewards=self.reward_set))
        correct, n = sum_across_ranks([float(sum(res.correct)), float(len(share))])
        return correct / max(1.0, n)

    def checkpoint(self, step: int) -> Path:
        """Every process calls it; ``self.parallel`` adds what the processes hold (RNG states,
        FSDP2 full weights and shards) and reports a failure of process 0 on every process."""
        summary = self.summary

        def write(**parallel_parts) -> Path:
            return save_checkpoint(
                self.dir, step, self.accel.unwrap_model(self.policy), self.tok, self.opt, self.sched, self.teacher,
                self.cfg.train.keep_last,
                extra={"summary": {**{k: v for k, v in summary.items() if k.startswith("accuracy_") or k == "noop_steps"},
                                   "wall_seconds": round(self.wall_before + time.time() - self.t_start, 1)},
                       "config": self.cfg.to_dict(), "init_weights": self.init_weights,
                       "world_size": self.parallel.world_size},
                **parallel_parts)

        return self.parallel.save_checkpoint(self.dir / "checkpoints" / f"step_{step:06d}", write, self.opt, self.teacher)

    def halt(self, done: int, e: RewardError) -> None:
        """A reward function failed: stop with a checkpoint of the last completed step ``done``."""
        self.close_logs()
        if done > self.start:
            kept = f"stopped with checkpoint {self.checkpoint(done)} (step {done})"
        else:
            kept = f"stopped at step {done}, " + (f"nothing trained since {self.resume.ckpt}" if self.resume.active
                                                  else "before any step completed")
        raise TrainingHalted(f"{e}; {kept}. Fix the function, then continue with --resume latest") from e

    def close_logs(self) -> None:
        self.metrics.close()
        self.samples.close()

    @contextlib.contextmanager
    def display(self):
        """The progress shown per step: a redrawn bar on a terminal, else one plain line per step
        (:class:`StepLines`). Yields ``show(rec)``."""
        cfg = self.cfg
        if not self.console.is_terminal:
            yield StepLines(self.console, cfg.train.steps, self.start).step
            return
        with _progress(self.console) as progress:
            bar = progress.add_task(f"{cfg.train.algorithm}", total=cfg.train.steps, completed=self.start, info="")

            def show(rec: dict) -> None:
                last = self.last_eval
                progress.update(bar, advance=1, info=f"reward {rec.get('reward/mean', 0.0):.3f}  loss {rec['loss']:.4f}"
                                + (f"  kl {rec['kl/token']:.3f}" if "kl/token" in rec else "")
                                + (f"  held-out acc {last[1]:.3f} (step {last[0]})" if last else ""))

            yield show

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """The final checkpoint, the accuracy after training, ``summary.json`` (and the hub upload)."""
        cfg, summary, run = self.cfg, self.summary, self.dir
        self.close_logs()
        resumed_done = (self.start == cfg.train.steps and self.resume.active
                        and self.resume.ckpt.parent.resolve() == (run / "checkpoints").resolve())
        ckpt = self.resume.ckpt if resumed_done else self.checkpoint(cfg.train.steps)  # resumed_done: nothing trained after it
        summary["checkpoint"] = str(ckpt)
        summary["steps"] = cfg.train.steps
        if cfg.eval.before_after:
            # greedy decoding: the eval.every measurement after the last step is the same number
            last = self.last_eval
            summary["accuracy_after"] = last[1] if last and last[0] == cfg.train.steps else self.held_out_accuracy()
            self.console.print(f"held-out accuracy after training:  [bold]{summary['accuracy_after']:.3f}[/] "
                               f"(n={len(self.heldout)})")
        summary["wall_seconds"] = round(self.wall_before + time.time() - self.t_start, 1)  # every segment of a resumed run
        if self.parallel.is_main:
            (run / "summary.json").write_text(json.dumps(summary, indent=1))
        if cfg.train.push_to_hub and self.parallel.is_main:  # after summary.json: a failed upload loses nothing
            from .hub import push_checkpoint

            summary["pushed_to"] = push_checkpoint(ckpt, cfg.train.push_to_hub, private=cfg.train.hub_private)
            (run / "summary.json").write_text(json.dumps(summary, indent=1))
            self.console.print(f"pushed {ckpt / 'model'} to {summary['pushed_to']}", markup=False, highlight=False)
        self.console.print(f"run directory: {run}  (summary.json, metrics.jsonl, config.yaml, checkpoints/)", markup=False,
                           highlight=False)
        return summary


@holding_run_lock  # one run per output directory (<output_dir>/.lock); before anything in it is touched
def train(cfg: Config, console: Console | None = None, overwrite: bool = False, *, model=None, tokenizer=None, task=None,
          rewards=()) -> dict:
    """Run training as configured; returns the summary (also written to ``summary.json``).

    A fresh run in a directory that holds another run is refused unless ``overwrite`` (then the
    old run's files are removed once every check of the new run has passed).

    The Python API (:mod:`ogls_sd.api`) passes what a config cannot hold: ``model`` / ``tokenizer``
    objects, the training data as a ``task``, and reward functions as callables (``rewards``: after
    ``reward.funcs``; see :func:`~ogls_sd.rewards.functions.resolve`)."""
    console = console if console is not None else default_console()
    run = Run(cfg, console, preflight(cfg, rewards))  # resolves and checks train.resume
    finished = run.resume.finished(run.dir, cfg)
    if finished is not None:  # a finished run resumed with train.steps = its steps: nothing to do
        console.print(f"the run already reached train.steps={cfg.train.steps} ({run.resume.ckpt}): nothing to do",
                      markup=False, highlight=False)
        return finished
    old_run = [] if run.resume.active else check_fresh_run_dir(run.dir, overwrite, restart_unsaved=bool(cfg.train.resume))
    run.start_processes()  # threads, seed, accelerator, parallelism mode
    run.load(model=model, tokenizer=tokenizer, task=task)  # policy, teacher, parallelism, algorithm, optimizer
    run.restore()  # summary; on resume the optimizer, scheduler, EMA state
    run.prepare(old_run)  # rollout engine, held-out set; then the run directory and its logs
    run.begin()  # accuracy before training, sampling RNG
    with run.display() as show:
        for step in range(run.start, cfg.train.steps):
            t0 = time.time()
            try:
                with run.parallel.step_scope():  # FSDP2: gathered until optimize() reduce-scatters the gradients
                    batch, parts = run.collect(step)  # 1–3: prompts, G rollouts each, rewards
                    t1 = time.time()
                    plan = run.plan(batch, step)  # 4–6: pools, targets, advantages
                    res = run.optimize(plan)  # loss terms, gradient reduction, clip, optimizer step, teacher update
            except RewardError as e:  # only the rollouts' rewards raise it: nothing of this step was applied
                run.halt(step, e)
            run.apply(step, res)  # finite weights, lr schedule, new weights to the rollout engine
            t2 = time.time()
            rec = run.record(step, batch, plan, res, parts, {"rollout": t1 - t0, "train": t2 - t1, "step": time.time() - t0})
            run.evaluate(step, rec)  # eval.every: held-out accuracy
            run.write(step, batch, rec)  # metrics.jsonl, completions.jsonl
            show(rec)
            run.watch(step, res, rec)  # no-op warning, non-finite stop, save_every checkpoints
    return run.finish()
