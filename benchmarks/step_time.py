"""Per-phase time of one optimizer step, in interleaved A/B rounds: ogls_sd (context pooling, 4 + 4
contexts; global pooling; lambda = 0), opsd, grpo and rft on one shared batch, and TRL's
``GRPOTrainer`` step on the same model, tokenizer, batch size and gradient-checkpointing setting.

Setup: a 3.4M-parameter Llama (hidden 256, 4 layers, MLP 768, the built-in char tokenizer), the
built-in arithmetic task, 8 prompts x 8 rollouts of up to ``--max-new-tokens`` tokens (the ``_long``
configurations: ``--long-factor`` times as many, so that attempts and targets are that much longer),
micro-batches of 16, AdamW, CPU, one process. Every step of ours samples the 64 rollouts (timed as
``rollout``) and then trains on one *shared* batch: the first step's completions with a fixed
reward pattern (3 of 8 correct in every group), so that every algorithm does the same work on the
same tokens whatever the random model generates. Phases:

* ``rollout``   ``transformers`` ``generate`` of the 64 completions;
* ``teacher``   teacher passes: the plan (global directions, GRPO reference) and OGLS-SD / OPSD
                teacher targets (anchor and context passes) computed inside the loss;
* ``loss+bwd``  student forward, loss and backward over the micro-batches (teacher time excluded);
* ``optim``     gradient clipping, AdamW step, teacher update.

TRL: ``GRPOTrainer`` (``trl`` from the ``bench`` extra) on a copy of the same initial model, prompts
as text, ``num_generations=8``, ``per_device_train_batch_size=16`` with 4 accumulation steps (64
completions = one generation per optimizer step), the same sampling settings and completion limit,
``beta=0`` (as our GRPO default), reward = the task's verifier, and ``gradient_checkpointing`` set
explicitly (TRL's default is on): off in the ``trl_grpo`` row like ours in ``grpo``, on in
``trl_grpo_ckpt`` like ours in ``grpo_ckpt``. Its trainer runs in a thread that a callback holds
between optimizer steps; its step time (generation included) is the callback's ``on_step_begin`` ->
``on_step_end``.

Rounds: every configuration builds once; then each round takes one step of every configuration
(the order reversed every other round), so that the two sides of a ratio run minutes apart at most
and a machine whose speed drifts slows both. ``--warmup`` rounds are untimed. A ratio is the median
over the timed rounds of the per-round ratio of total step times; the table shows per-phase medians.
The last line is JSON::

    grpo_over_trl_grpo, grpo_over_trl_grpo_checkpointing, ogls_context_over_opsd,
    ogls_context_long_over_opsd, ogls_global_over_opsd, lambda0_over_rft

Usage (docs/performance.md)::

    pip install -e ".[bench]"     # trl
    OMP_NUM_THREADS=1 python benchmarks/step_time.py
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from ogls_sd.algorithms import Group, Rollout, StepBatch, build_algorithm, teacher_kind
from ogls_sd.config import Config
from ogls_sd.models import enable_checkpointing
from ogls_sd.rollout import SamplingParams
from ogls_sd.rollout.hf import HFBackend
from ogls_sd.tasks.arith import TEMPLATES, ArithTask
from ogls_sd.teacher import Teacher
from ogls_sd.templates import PromptBuilder
from ogls_sd.tiny import char_tokenizer, tiny_llama

PROMPTS, G, MICRO = 8, 8, 16
CORRECT = 3  # correct rollouts per group in the shared batch
CONTEXT = ["train.algorithm=ogls_sd", "steering.pooling=context", "steering.max_contexts=4"]
CKPT = ["model.gradient_checkpointing=true"]
# name -> (overrides, long: completions --long-factor times longer)
OURS = {
    "ogls_context": (CONTEXT, False),
    "ogls_global": (["train.algorithm=ogls_sd", "steering.pooling=global"], False),
    "lambda0": (["train.algorithm=ogls_sd", "steering.strength=0"], False),
    "opsd": (["train.algorithm=opsd"], False),
    "grpo": (["train.algorithm=grpo"], False),
    "grpo_ckpt": (["train.algorithm=grpo", *CKPT], False),
    "rft": (["train.algorithm=rft"], False),
    "ogls_context_long": (CONTEXT, True),
    "opsd_long": (["train.algorithm=opsd"], True),
}
TRL = {"trl_grpo": False, "trl_grpo_ckpt": True}  # name -> gradient checkpointing
RATIOS = {  # JSON key -> (numerator, denominator)
    "grpo_over_trl_grpo": ("grpo", "trl_grpo"),
    "grpo_over_trl_grpo_checkpointing": ("grpo_ckpt", "trl_grpo_ckpt"),
    "ogls_context_over_opsd": ("ogls_context", "opsd"),
    "ogls_context_long_over_opsd": ("ogls_context_long", "opsd_long"),
    "ogls_global_over_opsd": ("ogls_global", "opsd"),
    "lambda0_over_rft": ("lambda0", "rft"),
}
# the two sides of every ratio next to each other in a round
ORDER = ["ogls_context", "opsd", "ogls_global", "lambda0", "rft", "grpo", "trl_grpo", "grpo_ckpt", "trl_grpo_ckpt",
         "ogls_context_long", "opsd_long"]
PHASES = ("rollout", "teacher", "loss+bwd", "optim")


def build_model(tok, seed: int = 0):
    torch.manual_seed(seed)
    return tiny_llama(len(tok), hidden=256, layers=4, heads=4, intermediate=768,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def shared_batch(pb: PromptBuilder, backend: HFBackend, sampling: SamplingParams, exs) -> StepBatch:
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


class Ours:
    """One of our configurations, built once; :meth:`step` takes one timed optimizer step."""

    def __init__(self, overrides: list[str], new_tokens: int):
        cfg = Config.load(None, overrides + [f"rollout.max_new_tokens={new_tokens}", f"rollout.num_generations={G}",
                                             f"train.micro_batch_size={MICRO}"])
        tok = char_tokenizer()
        self.model = model = build_model(tok)
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(model)
        pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
        self.cfg, self.teacher = cfg, Teacher(model, teacher_kind(cfg), cfg.teacher.ema_decay)
        self.algo = build_algorithm(cfg, model, self.teacher, pb)
        self.clock = TeacherClock(self.algo)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.train.lr)
        self.backend = HFBackend(model, pb.pad_id, pb.eos_id)
        r = cfg.rollout
        self.sampling = SamplingParams(new_tokens, r.temperature, r.top_p, r.top_k)
        torch.manual_seed(1)
        self.batch = shared_batch(pb, self.backend, self.sampling, ArithTask().examples(PROMPTS, seed=1))
        self.prompts = [g.student_prompt for g in self.batch.groups for _ in range(G)]
        self.n = 0

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.backend.generate(self.prompts, self.sampling)  # timed, then discarded
        t1 = time.perf_counter()
        self.model.train()
        plan = self.algo.plan(self.batch, self.n)
        t2 = time.perf_counter()
        self.clock.seconds = 0.0
        for micro in plan.micro_batches(MICRO):
            loss, _ = self.algo.loss(plan, micro)
            loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.teacher.update()
        t4 = time.perf_counter()
        self.n += 1
        c = self.clock.seconds
        return {"rollout": t1 - t0, "teacher": t2 - t1 + c, "loss+bwd": t3 - t2 - c, "optim": t4 - t3, "total": t4 - t0}


class TRLGRPO:
    """TRL's ``GRPOTrainer`` in a thread that a callback holds before every optimizer step;
    :meth:`step` lets one step through and returns its time."""

    def __init__(self, args, steps: int, checkpointing: bool, out_dir: str):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        cfg = Config.load(None, [])
        tok = char_tokenizer()
        pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
        task = ArithTask()
        exs = task.examples(PROMPTS * (steps + 1), seed=1)
        data = Dataset.from_dict({"prompt": [tok.decode(pb.student_ids(ex)) for ex in exs],
                                  "answer": [ex.answer for ex in exs]})

        def reward(completions, answer, **_):
            return [float(task.reward(c, a)) for c, a in zip(completions, answer)]

        self.go, self.done, self.ready = threading.Semaphore(0), queue.Queue(), threading.Event()
        runner = self

        class Gate(TrainerCallback):
            def on_step_begin(self, *a, **k):
                runner.ready.set()
                runner.go.acquire()
                runner.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                runner.done.put(time.perf_counter() - runner.t0)

        r = cfg.rollout
        gargs = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * G // MICRO,
            num_generations=G, max_completion_length=args.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, beta=0.0, learning_rate=cfg.train.lr, max_grad_norm=cfg.train.max_grad_norm,
            max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
            dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=checkpointing,
        )
        self.trainer = GRPOTrainer(model=build_model(tok), reward_funcs=reward, args=gargs, train_dataset=data,
                                   processing_class=tok, callbacks=[Gate()])
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()
        # held at its first step: its setup (accelerate's shared state) is done before the next trainer's
        while not self.ready.wait(1.0):
            if not self.thread.is_alive():
                raise RuntimeError("TRL GRPOTrainer failed before its first step") from self.done.get_nowait()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as e:  # surfaced by step()
            self.done.put(e)

    def finish(self) -> None:
        """Wait for the trainer's own end of training (its last log lines)."""
        self.thread.join(timeout=600)

    def step(self) -> dict[str, float]:
        self.go.release()
        t = self.done.get(timeout=3600)
        if isinstance(t, BaseException):
            raise RuntimeError("TRL GRPOTrainer failed") from t
        return {"total": t}


def build(names: list[str], args) -> dict:
    runners = {}
    for name in names:
        if name in TRL:
            runners[name] = TRLGRPO(args, args.warmup + args.rounds, TRL[name], os.path.join(args.trl_dir, name))
        else:
            over, long = OURS[name]
            runners[name] = Ours(over, args.max_new_tokens * (args.long_factor if long else 1))
    return runners


def rounds(runners: dict, args) -> dict[str, list[dict[str, float]]]:
    """Per configuration, the phase times of every timed round (one step per round each)."""
    times: dict[str, list[dict[str, float]]] = defaultdict(list)
    names = list(runners)
    for r in range(args.warmup + args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = runners[name].step()
            print(f"  round {r} {name}: {t['total']:.2f} s", file=sys.stderr, flush=True)
            if r >= args.warmup:
                times[name].append(t)
    return times


def ratios(times: dict[str, list[dict[str, float]]]) -> dict[str, float | None]:
    out = {}
    for key, (a, b) in RATIOS.items():
        if a in times and b in times:
            out[key] = round(statistics.median(x["total"] / y["total"] for x, y in zip(times[a], times[b])), 3)
        else:
            out[key] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of every configuration each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--long-factor", type=int, default=4, help="the _long configurations: completions this many times longer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join([*OURS, *TRL]))
    ap.add_argument("--trl-dir", default="/tmp/ogls_sd_step_time_trl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in OURS and n not in TRL]
    if unknown:
        ap.error(f"--only: unknown configuration {unknown[0]!r}")
    names = [n for n in ORDER if n in only] if only else ORDER
    try:
        import trl
    except ImportError:
        trl = None
        print("# trl not installed (the bench extra): no TRL rows")
        names = [n for n in names if n not in TRL]
    print(f"# step_time: 3.4M Llama, {PROMPTS} prompts x {G} rollouts, <= {args.max_new_tokens} new tokens "
          f"({args.max_new_tokens * args.long_factor} for _long), micro-batch {MICRO}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up; torch {torch.__version__}"
          + (f", trl {trl.__version__}" if trl else ""))
    runners = build(names, args)
    times = rounds(runners, args)
    for r in runners.values():
        getattr(r, "finish", lambda: None)()
    print("\n| configuration | rollout (s) | teacher (s) | loss+bwd (s) | optim (s) | total (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runners:
        ts = times.get(name)
        if not ts:
            continue
        med = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
        cells = [f"{med[k]:.3f}" if k in med else "" for k in PHASES]
        print(f"| {name} | " + " | ".join(cells) + f" | {med['total']:.3f} |")
    print(json.dumps(ratios(times)))


if __name__ == "__main__":
    main()
