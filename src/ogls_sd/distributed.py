"""Data parallelism on top of ``torch.distributed`` (set up by ``accelerate launch``).

Each rank owns whole prompt groups (a prompt's G rollouts never straddle ranks, so pools and
group statistics stay local), the loss normalisers of a step are summed over ranks before any
loss is computed, and gradients are summed over ranks after the micro-batch loop. Together this
gives every rank the gradient of one big batch, so the same optimizer step keeps the replicas
identical. With one process every function here is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(n: int) -> slice:
    """This rank's share of ``n`` prompts (contiguous; ``n`` must divide evenly)."""
    rank, ws = world()
    if n % ws:
        raise ValueError(f"train.prompts_per_step={n} must be divisible by the number of processes ({ws})")
    k = n // ws
    return slice(rank * k, (rank + 1) * k)


def sum_across_ranks(values: list[float]) -> list[float]:
    rank, ws = world()
    if ws == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def globalize_plan(plan) -> None:
    """Sum the plan's normalisers (``GLOBAL_SUMS`` attributes) over ranks, in place; recurses
    into ``plan.subplans()`` (hybrids); ``plan`` is an ``algorithms.base.StepPlan``. Every rank must call it once per step."""
    for sub in plan.subplans():
        globalize_plan(sub)
    names = tuple(plan.GLOBAL_SUMS)
    if not names or world()[1] == 1:
        return
    for name, v in zip(names, sum_across_ranks([float(getattr(plan, n)) for n in names])):
        setattr(plan, name, type(getattr(plan, name))(v))


def sum_gradients(params: list[torch.nn.Parameter], bucket_numel: int = 1 << 25) -> None:
    """All-reduce (sum) the gradients of ``params``; a rank without a gradient contributes zeros.

    Gradients go in flat buckets of at most ``bucket_numel`` elements of one dtype (a large
    parameter alone), so the extra memory is one bucket, not a second copy of all gradients."""
    if world()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        if not buckets or p.grad.dtype != buckets[-1][0].grad.dtype or size + p.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    for bucket in buckets:
        flat = torch.cat([q.grad.reshape(-1) for q in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for q in bucket:
            q.grad.copy_(flat[off : off + q.numel()].view_as(q.grad))
            off += q.numel()


def sum_dicts(d: dict[str, float]) -> dict[str, float]:
    """Key-wise sum of a dict of numbers over ranks (keys may differ between ranks)."""
    if world()[1] == 1:
        return dict(d)
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, d)
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a collective); ``[obj]`` with one process."""
    if world()[1] == 1:
        return [obj]
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, obj)
    return parts


def barrier() -> None:
    """Wait for every rank (a no-op with one process)."""
    if world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down (a no-op without one). Without it
    gloo's threads can abort the interpreter at exit ("terminate called without an active
    exception"), failing a run that finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
