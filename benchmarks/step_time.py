"""Per-phase time of one optimizer step: ogls_sd (context pooling, 4 + 4 contexts), ogls_sd (global
pooling), opsd, grpo and rft on one shared batch, and TRL's ``GRPOTrainer`` step on the same model,
tokenizer and batch size.

Setup: a 3.4M-parameter Llama (hidden 256, 4 layers, MLP 768, the built-in char tokenizer), the
built-in arithmetic task, 8 prompts x 8 rollouts of up to ``--max-new-tokens`` tokens,
micro-batches of 16, AdamW, CPU, one process. Every step of ours samples the 64 rollouts (timed as
``rollout``) and then trains on one *shared* batch: the first step's completions with a fixed
reward pattern (3 of 8 correct in every group), so that every algorithm does the same work on the
same tokens whatever the random model generates. Phases:

* ``rollout``   ``transformers`` ``generate`` of the 64 completions;
* ``teacher``   teacher passes: the plan (global directions, GRPO reference) and OGLS-SD / OPSD
                teacher targets (anchor and context passes) computed inside the loss;
* ``loss+bwd``  student forward, loss and backward over the micro-batches (teacher time excluded);
* ``optim``     gradient clipping, AdamW step, teacher update.

TRL: ``GRPOTrainer`` (``trl`` from the ``bench`` extra, in a separate venv) on a copy of the same
initial model, prompts as text, ``num_generations=8``, ``per_device_train_batch_size=16`` with 4
accumulation steps (64 completions = one generation per optimizer step), the same sampling settings
and completion limit, ``beta=0`` (as our GRPO default), reward = the task's verifier. Its step time
(generation included) comes from a ``TrainerCallback``.

Each configuration runs ``--warmup`` + ``--steps`` steps; figures are medians over the timed steps.
The last line is JSON with the ratios of total step times::

    ogls_context_over_opsd, ogls_global_over_opsd, grpo_over_trl_grpo

Usage (docs/performance.md)::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -c constraints-cpu.txt -e ".[bench]"
    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/step_time.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from ogls_sd.algorithms import Group, Rollout, StepBatch, build_algorithm, teacher_kind
from ogls_sd.config import Config
from ogls_sd.rollout import SamplingParams
from ogls_sd.rollout.hf import HFBackend
from ogls_sd.tasks.arith import TEMPLATES, ArithTask
from ogls_sd.teacher import Teacher
from ogls_sd.templates import PromptBuilder
from ogls_sd.tiny import char_tokenizer, tiny_llama

PROMPTS, G, MICRO = 8, 8, 16
CORRECT = 3  # correct rollouts per group in the shared batch
OURS = {
    "ogls_context": ["train.algorithm=ogls_sd", "steering.pooling=context", "steering.max_contexts=4"],
    "ogls_global": ["train.algorithm=ogls_sd", "steering.pooling=global"],
    "opsd": ["train.algorithm=opsd"],
    "grpo": ["train.algorithm=grpo"],
    "rft": ["train.algorithm=rft"],
}


def build_model(tok, seed: int = 0):
    torch.manual_seed(seed)
    return tiny_llama(len(tok), hidden=256, layers=4, heads=4, intermediate=768,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def shared_batch(tok, pb: PromptBuilder, backend: HFBackend, sampling: SamplingParams, task, exs) -> StepBatch:
    """The first generation's completions with a fixed reward pattern (the same batch for all)."""
    groups = [Group(ex, pb.student_ids(ex), pb.teacher_ids(ex)) for ex in exs]
    comps = backend.generate([g.student_prompt for g in groups for _ in range(G)], sampling)
    rollouts = []
    for k, c in enumerate(comps):
        gi, j = divmod(k, G)
        rollouts.append(Rollout(gi, c.ids, c.finished, 1.0 if j < CORRECT else 0.0))
        groups[gi].rollouts.append(k)
    return StepBatch(groups, rollouts)


class TeacherClock:
    """Time spent in ``algo._teacher_target`` (teacher passes made inside the loss)."""

    def __init__(self, algo):
        self.seconds = 0.0
        inner = getattr(algo, "_teacher_target", None)
        if inner is None:
            return

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        algo._teacher_target = timed


def run_ours(name: str, overrides: list[str], args) -> dict[str, list[float]]:
    cfg = Config.load(None, overrides + [f"rollout.max_new_tokens={args.max_new_tokens}",
                                         f"rollout.num_generations={G}", f"train.micro_batch_size={MICRO}"])
    tok = char_tokenizer()
    model = build_model(tok)
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    teacher = Teacher(model, teacher_kind(cfg), cfg.teacher.ema_decay)
    algo = build_algorithm(cfg, model, teacher, pb)
    clock = TeacherClock(algo)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    backend = HFBackend(model, pb.pad_id, pb.eos_id)
    sampling = SamplingParams(args.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
    task = ArithTask()
    exs = task.examples(PROMPTS, seed=1)
    torch.manual_seed(1)
    batch = shared_batch(tok, pb, backend, sampling, task, exs)
    times: dict[str, list[float]] = defaultdict(list)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        backend.generate([g.student_prompt for g in batch.groups for _ in range(G)], sampling)  # timed, then discarded
        t1 = time.perf_counter()
        model.train()
        plan = algo.plan(batch, step)
        t2 = time.perf_counter()
        clock.seconds = 0.0
        for micro in plan.micro_batches(MICRO):
            loss, _ = algo.loss(plan, micro)
            loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update()
        t4 = time.perf_counter()
        if step >= args.warmup:
            times["rollout"].append(t1 - t0)
            times["teacher"].append(t2 - t1 + clock.seconds)
            times["loss+bwd"].append(t3 - t2 - clock.seconds)
            times["optim"].append(t4 - t3)
            times["total"].append(t4 - t0)
        print(f"  {name} step {step}: {t4 - t0:.2f} s", file=sys.stderr, flush=True)
    return times


def run_trl(args) -> dict[str, list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = Config.load(None, [])
    tok = char_tokenizer()
    model = build_model(tok)
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    task = ArithTask()
    n = PROMPTS * (args.warmup + args.steps + 1)
    exs = task.examples(n, seed=1)
    data = Dataset.from_dict({"prompt": [tok.decode(pb.student_ids(ex)) for ex in exs],
                              "answer": [ex.answer for ex in exs]})

    def reward(completions, answer, **_):
        return [float(task.reward(c, a)) for c, a in zip(completions, answer)]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    gargs = GRPOConfig(
        output_dir=args.trl_dir, per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * G // MICRO,
        num_generations=G, max_completion_length=args.max_new_tokens, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, beta=0.0, learning_rate=cfg.train.lr,
        max_grad_norm=cfg.train.max_grad_norm, max_steps=args.warmup + args.steps, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=gargs, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    totals = [stamps[i + 1] - stamps[i] for i in range(0, len(stamps) - 1, 2)]
    for i, t in enumerate(totals):
        print(f"  trl_grpo step {i}: {t:.2f} s", file=sys.stderr, flush=True)
    return {"total": totals[args.warmup:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (medians over them)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join([*OURS, "trl_grpo"]))
    ap.add_argument("--trl-dir", default="/tmp/ogls_sd_step_time_trl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(",")))
    med: dict[str, dict[str, float]] = {}
    print(f"# step_time: 3.4M Llama, {PROMPTS} prompts x {G} rollouts, <= {args.max_new_tokens} new tokens, micro-batch "
          f"{MICRO}, {args.threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up; torch "
          f"{torch.__version__}")
    for name, over in OURS.items():
        if only and name not in only:
            continue
        med[name] = {k: statistics.median(v) for k, v in run_ours(name, over, args).items()}
    if not only or "trl_grpo" in only:
        try:
            import trl

            med["trl_grpo"] = {k: statistics.median(v) for k, v in run_trl(args).items()}
            print(f"# trl {trl.__version__}")
        except ImportError:
            print("# trl not installed (the bench extra): no TRL row")
    print("\n| configuration | rollout (s) | teacher (s) | loss+bwd (s) | optim (s) | total (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        cells = [f"{m[k]:.3f}" if k in m else "" for k in ("rollout", "teacher", "loss+bwd", "optim")]
        print(f"| {name} | " + " | ".join(cells) + f" | {m['total']:.3f} |")

    def ratio(a: str, b: str):
        return round(med[a]["total"] / med[b]["total"], 3) if a in med and b in med else None

    print(json.dumps({"ogls_context_over_opsd": ratio("ogls_context", "opsd"),
                      "ogls_global_over_opsd": ratio("ogls_global", "opsd"),
                      "grpo_over_trl_grpo": ratio("grpo", "trl_grpo")}))


if __name__ == "__main__":
    main()
