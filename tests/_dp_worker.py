"""One optimizer step of an algorithm on hand-made rollouts, with the trainer's own ``optimize``;
run by ``tests/test_data_parallel.py`` under ``torchrun`` with 1 and with 2 processes.

Usage: ``torchrun --nproc_per_node N tests/_dp_worker.py [--fsdp] OUT_DIR CASE [CASE ...]`` where a
CASE is ``NAME=ALGORITHM[,OVERRIDE,...]`` (``python tests/_dp_worker.py ...`` runs one process).
For each case every rank builds the same tiny model and the same 4 prompt groups, keeps its share
of the groups (the trainer's ``rank_slice``), takes 2 optimizer steps, and writes its parameters
to ``OUT_DIR/NAME/ws{N}_rank{R}.safetensors``. With ``--fsdp`` the model (and the teacher copy) is
sharded with FSDP2 (``ogls_sd.sharding``) as the trainer does with ``train.fsdp=true``, and rank 0
writes the gathered full weights to ``OUT_DIR/NAME/fsdp{N}_rank0.safetensors``.
"""

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from ogls_sd.algorithms import Group, Rollout, StepBatch, build_algorithm, teacher_kind
from ogls_sd.config import Config
from ogls_sd.distributed import globalize_plan, rank_slice, shutdown, world
from ogls_sd.sharding import Sharding
from ogls_sd.tasks.arith import TEMPLATES, ArithTask
from ogls_sd.teacher import Teacher
from ogls_sd.templates import PromptBuilder
from ogls_sd.tiny import char_tokenizer
from ogls_sd.trainer import optimize

from conftest import peaked_tiny_llama  # tests/ is on sys.path: this script lives there

# Rewards of the G=4 rollouts of each of the 4 prompts: mixed, all wrong, all right, mixed.
REWARDS = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]


def batch_for_rank(tok, pb: PromptBuilder) -> StepBatch:
    task = ArithTask()
    exs = task.examples(len(REWARDS), seed=3)
    rng = random.Random(0)
    texts = [[ex.reference if r else task.wrong_attempt(ex, rng) for r in rs] for ex, rs in zip(exs, REWARDS)]
    sl = rank_slice(len(exs))
    groups, rollouts = [], []
    for gi, (ex, rs, ts) in enumerate(zip(exs[sl], REWARDS[sl], texts[sl])):
        g = Group(ex, pb.student_ids(ex), pb.teacher_ids(ex))
        for r, text in zip(rs, ts):
            g.rollouts.append(len(rollouts))
            rollouts.append(Rollout(gi, pb.text_ids(text) + [tok.eos_token_id], True, float(r)))
        groups.append(g)
    return StepBatch(groups, rollouts if build_needs_rollouts else [])


build_needs_rollouts = True


def main() -> None:
    args = sys.argv[1:]
    fsdp = "--fsdp" in args
    args = [a for a in args if a != "--fsdp"]
    out, cases = Path(args[0]), args[1:]
    accel = Accelerator(cpu=True)
    for case in cases:
        name, spec = case.split("=", 1)
        algorithm, *overrides = spec.split(",")
        run_case(accel, out / name, algorithm, overrides, fsdp)
    shutdown()


def run_case(accel, out: Path, algorithm: str, overrides: list[str], fsdp: bool = False) -> None:
    global build_needs_rollouts
    rank, ws = world()
    cfg = Config.load(None, [f"train.algorithm={algorithm}", "train.micro_batch_size=3", "train.max_grad_norm=0.5",
                             "train.lr=1e-2", *overrides])
    tok = char_tokenizer()
    model = peaked_tiny_llama(tok)
    model.double()  # float64, so that a different summation order (ranks) stays far below the tolerance
    if cfg.model.gradient_checkpointing:
        from ogls_sd.models import enable_checkpointing

        enable_checkpointing(model)
    if cfg.model.lora:  # as models.load_policy does
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM"))
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    teacher = Teacher(model, teacher_kind(cfg), cfg.teacher.resolve_ema_decay(cfg.train.algorithm), lora=cfg.model.lora)
    algo = build_algorithm(cfg, model, teacher, pb)
    build_needs_rollouts = algo.needs_rollouts
    shard = Sharding(model, teacher.copy, lora=cfg.model.lora) if fsdp else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    if shard is None:
        opt = accel.prepare(opt)
    batch = batch_for_rank(tok, pb)
    for step in range(2):
        if shard is not None:
            shard.gather()  # as the trainer: the plan's teacher passes run on gathered parameters
        plan = algo.plan(batch, step)
        globalize_plan(plan)
        res = optimize(cfg, algo, plan, accel, model, params, opt, teacher, shard=shard)
        assert not res.skipped
    out.mkdir(parents=True, exist_ok=True)
    tag = f"fsdp{ws}" if fsdp else f"ws{ws}"
    sd = shard.full_state_dict() if shard is not None else model.state_dict()
    if shard is None or rank == 0:
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, out / f"{tag}_rank{rank}.safetensors")
    if shard is not None:  # what this rank holds at rest, and the weights a vLLM engine would receive
        from torch.distributed.tensor import DTensor

        from ogls_sd.rollout.vllm_backend import full_weights

        local = sum(p.to_local().numel() if isinstance(p, DTensor) else 0 for p in model.parameters())
        total = sum(p.numel() for p in model.parameters() if isinstance(p, DTensor))
        (out / f"{tag}_rank{rank}.held.json").write_text(json.dumps({"local": local, "total": total}))
        with full_weights(model) as weights:  # every rank: each tensor is gathered collectively
            pushed = {name: t.detach().clone() for name, t in weights}
        if rank == 0:
            save_file(pushed, out / f"{tag}_rank0.vllm.safetensors")
    (out / f"{tag}_rank{rank}.gradnorm").write_text(repr(res.grad_norm))
    (out / f"{tag}_rank{rank}.agg.json").write_text(json.dumps(res.agg))


if __name__ == "__main__":
    main()
