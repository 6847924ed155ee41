"""The training loop: rollouts → rewards → algorithm loss terms → optimizer step → logs/checkpoints.

Read ``train`` top to bottom: it is the step of method.md §3 around the algorithm's
``plan``/``loss`` interface.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .algorithms import Group, Rollout, StepBatch, build_algorithm, needs_teacher
from .checkpoint import save_checkpoint
from .config import Config
from .evaluate import evaluate_accuracy
from .markers import marker_metrics
from .models import load_policy
from .rollout import SamplingParams, build_backend
from .teacher import Teacher
from .templates import PromptBuilder


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False,
    )


class MetricsLog:
    """Per-step metrics as JSON lines in ``<run>/metrics.jsonl``, also routed to ``tracker``
    (``train.report_to``, see ``tracking.py``)."""

    def __init__(self, path: Path, tracker=None):
        self.path = path
        self.f = open(path, "a", buffering=1)
        self.tracker = tracker

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tracker is not None:
            self.tracker.log(rec, step=rec.get("step"))

    def close(self) -> None:
        self.f.close()
        if self.tracker is not None:
            self.tracker.close()


def _p90(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)])


def train(cfg: Config, console: Console | None = None) -> dict:
    """Run training as configured; returns the summary (also written to ``summary.json``)."""
    from accelerate import Accelerator
    from transformers import set_seed

    console = console or Console()
    t_start = time.time()
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / "config.yaml")
    set_seed(cfg.train.seed)
    accel = Accelerator(cpu=cfg.train.device == "cpu", mixed_precision=cfg.train.mixed_precision)

    with _progress(console) as progress:
        policy, tok, task, task_tpl, info = load_policy(cfg, progress)
    policy.to(accel.device)
    prompts = PromptBuilder(tok, cfg.templates, task_tpl)
    # algorithms that never read the teacher (SFT, RFT, GRPO without KL) get no teacher copy
    teacher = Teacher(policy, cfg.teacher.kind if needs_teacher(cfg) else "live", cfg.teacher.ema_decay, lora=cfg.model.lora)
    algo = build_algorithm(cfg, policy, teacher, prompts)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.train.warmup_steps)))
    policy, opt = accel.prepare(policy, opt)
    backend = build_backend(cfg.rollout, policy, prompts.pad_id, prompts.eos_id, cfg=cfg, is_main_process=accel.is_main_process)
    sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
    heldout = task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test")
    from .tracking import open_tracker

    log = MetricsLog(run / "metrics.jsonl", open_tracker(cfg.train.report_to, run, cfg.to_dict()))
    summary: dict = {"algorithm": cfg.train.algorithm, "model": info, "output_dir": str(run)}

    def held_out_accuracy() -> float:
        r = evaluate_accuracy(policy, tok, prompts, task, heldout, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        return r.accuracy

    if cfg.eval.before_after:
        summary["accuracy_before"] = held_out_accuracy()
        console.print(f"held-out accuracy before training: [bold]{summary['accuracy_before']:.3f}[/] (n={len(heldout)})")
        if cfg.eval.every:  # the accuracy curve starts at step 0
            log.write({"step": 0, "eval/accuracy": summary["accuracy_before"]})
    last_eval: tuple[int, float] | None = None  # (step, accuracy) of the latest eval.every measurement

    G = cfg.rollout.num_generations
    with _progress(console) as progress:
        bar = progress.add_task(f"{cfg.train.algorithm}", total=cfg.train.steps, info="")
        for step in range(cfg.train.steps):
            t0 = time.time()
            # 1. prompts of this step (deterministic in (seed, step): resumable)
            exs = task.examples(cfg.train.prompts_per_step, seed=cfg.data.seed * 1_000_003 + step, split="train")
            groups = [Group(ex, prompts.student_ids(ex), prompts.teacher_ids(ex)) for ex in exs]
            # 2. G rollouts per prompt from the student, on token ids (none for SFT)
            comps = backend.generate([g.student_prompt for g in groups for _ in range(G)], sampling) if algo.needs_rollouts else []
            t_roll = time.time() - t0
            # 3. outcomes r_i
            rollouts = []
            for k, c in enumerate(comps):
                gi = k // G
                text = tok.decode(c.ids, skip_special_tokens=True)
                rollouts.append(Rollout(gi, c.ids, c.finished, task.reward(text, groups[gi].example.answer)))
                groups[gi].rollouts.append(k)
            batch = StepBatch(groups, rollouts)
            # 4-6. pools, steering, loss terms; gradient accumulation over micro-batches
            t1 = time.time()
            plan = algo.plan(batch, step)
            agg: dict[str, float] = {}
            policy.train()
            # inner_steps > 1 (GRPO's PPO epochs): several optimizer steps on the same plan; the
            # logged loss terms and grad norm are their means
            inner = max(1, getattr(algo, "inner_steps", 1))
            gns = []
            for _ in range(inner):
                for micro in plan.micro_batches(cfg.train.micro_batch_size):
                    loss, m = algo.loss(plan, micro)
                    accel.backward(loss)
                    agg["loss"] = agg.get("loss", 0.0) + float(loss.detach())
                    for k, v in m.items():
                        agg[k] = agg.get(k, 0.0) + v
                gn = accel.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm > 0 else None
                gns.append(float(gn) if gn is not None else 0.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                teacher.update()
            sched.step()
            backend.sync_weights(policy)  # the rollout engine samples the next step from the new weights (no-op for hf)
            if inner > 1:
                agg = {k: v / inner for k, v in agg.items()}
            gn = sum(gns) / len(gns)
            t_train = time.time() - t1

            # metrics (method.md §6)
            lens = [len(r.ids) for r in rollouts] or [0]
            n_roll = max(1, len(rollouts))
            rows = agg.get("distill_rows", 0.0)
            rec = {
                "step": step + 1,
                "reward/mean": sum(r.reward for r in rollouts) / n_roll,
                **plan.metrics,
                "loss": agg.get("loss", 0.0),
                "distill_loss": agg.get("distill_loss", 0.0),
                "tail_nll": agg.get("tail_nll", 0.0),
                "kl/token": agg.get("kl_sum", 0.0) / rows if rows else 0.0,
                "entropy/teacher": agg.get("teacher_entropy_sum", 0.0) / rows if rows else 0.0,
                "entropy/student": agg.get("student_entropy_sum", 0.0) / rows if rows else 0.0,
                "steer/rms": agg.get("steer_rms_sum", 0.0) / rows if rows else 0.0,
                "clip/frac": agg.get("clipped_sum", 0.0) / agg["clip_den_sum"] if agg.get("clip_den_sum") else 0.0,
                "completion/len_mean": sum(lens) / len(lens),
                "completion/len_p90": _p90(lens),
                "completion/truncated": sum(not r.finished for r in rollouts) / n_roll,
                "completion/eos": sum(r.finished for r in rollouts) / n_roll,
                "grad_norm": gn,
                "lr": sched.get_last_lr()[0],
                "time/rollout_s": t_roll,
                "time/train_s": t_train,
                "time/step_s": time.time() - t0,
                "throughput/rollout_tok_s": sum(lens) / max(t_roll, 1e-9),
                "tokens/rollout": float(sum(len(r.ids) for r in rollouts)),
                **marker_metrics([tok.decode(r.ids, skip_special_tokens=True) for r in rollouts],
                                 getattr(task, "template_marker", None), cfg.train.reflection_markers),
                **algo.step_metrics(agg),
            }
            if not rollouts:  # SFT: nothing was generated; no rollout statistics
                for k in ("reward/mean", "completion/len_mean", "completion/len_p90", "completion/truncated",
                          "completion/eos", "throughput/rollout_tok_s"):
                    rec.pop(k)
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.train.steps):
                last_eval = (step + 1, held_out_accuracy())
                rec["eval/accuracy"] = last_eval[1]
            log.write(rec)
            progress.update(bar, advance=1, info=f"reward {rec.get('reward/mean', 0.0):.3f}  loss {rec['loss']:.4f}  kl {rec['kl/token']:.3f}")
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.steps:
                save_checkpoint(run, step + 1, accel.unwrap_model(policy), tok, opt, sched, teacher, cfg.train.keep_last)
    log.close()

    ckpt = save_checkpoint(run, cfg.train.steps, accel.unwrap_model(policy), tok, opt, sched, teacher, cfg.train.keep_last)
    summary["checkpoint"] = str(ckpt)
    summary["steps"] = cfg.train.steps
    if cfg.eval.before_after:
        # greedy decoding: the eval.every measurement after the last step is the same number
        summary["accuracy_after"] = last_eval[1] if last_eval and last_eval[0] == cfg.train.steps else held_out_accuracy()
        console.print(f"held-out accuracy after training:  [bold]{summary['accuracy_after']:.3f}[/] (n={len(heldout)})")
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"run directory: {run}  (summary.json, metrics.jsonl, config.yaml, checkpoints/)")
    return summary
