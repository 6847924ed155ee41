"""Per-process memory of data parallel vs FSDP2 (``ogls_sd.sharding``) on CPU: RSS at rest (after
an optimizer step, gathered weights released) and peak RSS during a step, 2 processes (gloo).

A Llama built in-process (hidden 512, 8 layers, MLP 2048: 25M parameters with the char
tokenizer), float32, AdamW, OGLS-SD with a frozen teacher copy, 2 optimizer steps on 8 prompt groups
of 4 hand-made rollouts (as ``tests/_dp_worker.py``). RSS is read from ``/proc/self/statm`` after
``gc.collect()`` and glibc's ``malloc_trim(0)`` (freed memory handed back to the system); the peak
is sampled every 2 ms by a thread. Run each mode in its own launch:

    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py            # data parallel
    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --fsdp     # FSDP2

Each process prints one JSON line (MiB): ``rest_before`` (model, teacher copy and optimizer built,
before any step), ``rest_after`` (after 2 steps: optimizer moments exist), ``peak_step`` and
``params_held`` (parameter elements this process stores at rest).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from _rss import PeakSampler, rss  # benchmarks/ is on sys.path: scripts run by path


def settle() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return rss() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from accelerate import Accelerator

    from ogls_sd.algorithms import Group, Rollout, StepBatch, build_algorithm, teacher_kind
    from ogls_sd.config import Config
    from ogls_sd.distributed import globalize_plan, rank_slice, shutdown, world
    from ogls_sd.tasks.arith import TEMPLATES, ArithTask
    from ogls_sd.teacher import Teacher
    from ogls_sd.templates import PromptBuilder
    from ogls_sd.tiny import char_tokenizer, tiny_llama
    from ogls_sd.trainer import optimize

    rank, ws = world()
    cfg = Config.load(None, ["train.algorithm=ogls_sd", "teacher.kind=frozen", "train.micro_batch_size=8"])
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=args.hidden, layers=args.layers, heads=8, intermediate=4 * args.hidden,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    teacher = Teacher(model, teacher_kind(cfg), cfg.teacher.ema_decay)
    shard = None
    if args.fsdp:
        from ogls_sd.sharding import Sharding

        shard = Sharding(model, teacher.copy)
    algo = build_algorithm(cfg, model, teacher, pb)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    accel = Accelerator(cpu=True)
    if shard is None:
        opt = accel.prepare(opt)

    task = ArithTask()
    exs = task.examples(8, seed=3)
    rng = random.Random(0)
    sl = rank_slice(len(exs))
    groups, rollouts = [], []
    for gi, ex in enumerate(exs[sl]):
        g = Group(ex, pb.student_ids(ex), pb.teacher_ids(ex))
        for j in range(4):
            text = ex.reference if j == 0 else task.wrong_attempt(ex, rng)
            g.rollouts.append(len(rollouts))
            rollouts.append(Rollout(gi, pb.text_ids(text) + [tok.eos_token_id], True, 1.0 if j == 0 else 0.0))
        groups.append(g)
    batch = StepBatch(groups, rollouts)

    from torch.distributed.tensor import DTensor

    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    if teacher.copy is not None:
        held += sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in teacher.copy.parameters())
    rest_before = settle()
    sampler = PeakSampler(0.002)
    sampler.start()
    for step in range(2):
        if shard is not None:
            shard.gather()
        plan = algo.plan(batch, step)
        globalize_plan(plan)
        optimize(cfg, algo, plan, accel, model, params, opt, teacher, shard)
    sampler.stop = True
    sampler.join()
    rest_after = settle()
    rec = {"mode": "fsdp2" if args.fsdp else "data_parallel", "rank": rank, "processes": ws,
           "parameters": sum(p.numel() for p in model.parameters()), "params_held": held,
           "rest_before": round(rest_before, 1), "rest_after": round(rest_after, 1), "peak_step": round(sampler.peak / 2**20, 1)}
    print(json.dumps(rec), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
