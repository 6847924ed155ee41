"""How a run is spread over processes: one strategy object per mode, chosen by
:func:`choose_parallelism`, behind one interface the trainer uses.

* :class:`SingleProcess` — one process; every collective is a no-op.
* :class:`DataParallel` — several processes (``accelerate launch`` / ``torchrun``), each holding
  whole prompt groups; gradients summed across processes (:mod:`ogls_sd.distributed`).
* :class:`FSDP2` — ``train.fsdp`` (or an accelerate FSDP config): parameters, gradients, optimizer
  and teacher-copy state sharded at rest, gathered for a step (:mod:`ogls_sd.sharding`).

A strategy owns what differs between the modes: the scope a step's compute runs in
(:meth:`~Parallelism.step_scope`), the gradient reduction and clipping after the micro-batches
(:meth:`~Parallelism.reduce_and_clip`), which process writes (:attr:`~Parallelism.is_main`), and
the checkpoint parts that are not plain files of process 0 (:meth:`~Parallelism.save_checkpoint`,
:meth:`~Parallelism.restore_optimizer`). The arithmetic stays in distributed.py / sharding.py /
checkpoint.py; this module only decides which of it a mode runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.markup import escape

from .checkpoint import SHARDED, CheckpointError, restoring, rng_state
from .config import Config
from .distributed import barrier, gather_objects, sum_across_ranks, sum_gradients, world
from .sharding import Sharding, clip_grad_norm, is_sharded


def warn(console: Console, msg: str) -> None:
    """A one-line warning, printed by one process (before the process group exists, the
    launcher's ``RANK`` says which)."""
    rank = world()[0] if world()[1] > 1 else int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        console.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # one line


def accelerate_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config (configs/accelerate/fsdp.yaml) sets this."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def make_accelerator(cfg: Config):
    """The run's ``accelerate.Accelerator`` and whether it shards (FSDP2), after checking that the
    launch is one the trainer supports. Returns ``(accelerator, fsdp)``."""
    from accelerate import Accelerator

    # device=auto without a GPU is CPU: say so, or accelerate would not join the processes of
    # a multi-process CPU launch into one group (each would think it is rank 0).
    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if "WORLD_SIZE" not in os.environ:  # one process: a second train() in it may use other accelerate settings
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    fsdp = cfg.train.fsdp or accelerate_fsdp()
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
    return accel, fsdp


class Parallelism:
    """The interface (and the one-process behaviour). The model is never wrapped (no DDP): the
    algorithms call the backbone directly, and gradients are reduced explicitly after the
    micro-batch loop."""

    sharded = False  # the optimizer state lives in shards (checkpoint: ``sharded/``)

    def __init__(self, accel):
        self.accel = accel
        self.rank, self.world_size = world()

    @property
    def is_main(self) -> bool:
        """This process writes the run's files (metrics, config, checkpoints, summary)."""
        return self.rank == 0

    def step_scope(self):
        """The context a step's compute (rollouts, plan, loss terms) runs in."""
        return contextlib.nullcontext()

    def prepare_optimizer(self, opt):
        return self.accel.prepare(opt)

    def begin_pass(self) -> None:
        """Before one pass of micro-batches (FSDP2: gather the parameters)."""

    def agree_finite(self, finite: bool) -> bool:
        """Whether the pass was finite on every process (every process must call it)."""
        return finite

    def reduce(self, params: list, finite: bool) -> None:
        """Reduce the gradients accumulated over the micro-batches (``finite``: agreed)."""

    def clip(self, params: list, max_norm: float) -> float:
        """Clip to ``max_norm`` (``<= 0``: no clipping); the total gradient norm before clipping."""
        if max_norm > 0:
            return float(self.accel.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack(
            [p.grad.detach().norm() for p in params if p.grad is not None] or [torch.zeros(())])))

    def reduce_and_clip(self, params: list, finite: bool, max_norm: float) -> float | None:
        """After a pass of micro-batches: agree on finiteness, reduce the gradients, clip. Returns
        the gradient norm, or None when the pass (on any process) or its norm was not finite."""
        finite = self.agree_finite(finite)
        self.reduce(params, finite)
        if not finite:
            return None
        gn = self.clip(params, max_norm)
        return gn if math.isfinite(gn) else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, final: Path, write: Callable[..., Path], opt, teacher) -> Path:
        """Write checkpoint ``final`` with ``write(state_dict=..., sharded_dir=..., rng_ranks=...)``
        (:func:`~ogls_sd.checkpoint.save_checkpoint` with the run's other arguments bound). Every
        process calls it."""
        return write()

    def restore_optimizer(self, ckpt: Path, state: dict, opt, teacher) -> None:
        """Load the optimizer state of checkpoint ``ckpt`` (``state``: its ``trainer_state.pt``)."""
        with restoring(ckpt / "trainer_state.pt", "optimizer or scheduler state"):
            opt.load_state_dict(state["optimizer"])

    def ema_in_shards(self, teacher) -> bool:
        """The EMA teacher state is restored with the optimizer shards, not from ``teacher_ema.safetensors``."""
        return False


class SingleProcess(Parallelism):
    """One process: the gradients are this process's; nothing to reduce."""


class DataParallel(Parallelism):
    """Several processes, each with a full replica: the finiteness of a step is agreed, the
    gradients summed (:func:`~ogls_sd.distributed.sum_gradients`), and process 0 writes the
    checkpoint with every process's RNG state."""

    def agree_finite(self, finite: bool) -> bool:
        # every rank must take part in the reduction, finite or not
        return sum_across_ranks([0.0 if finite else 1.0])[0] == 0.0

    def reduce(self, params: list, finite: bool) -> None:
        if finite:
            sum_gradients([p for p in params if not is_sharded(p)])

    def collective_parts(self, final: Path, opt, teacher) -> dict:
        """The checkpoint parts every process takes part in (beyond the RNG states)."""
        return {}

    def save_checkpoint(self, final: Path, write: Callable[..., Path], opt, teacher) -> Path:
        rngs = gather_objects(rng_state())
        parts = self.collective_parts(final, opt, teacher)
        failed: Exception | None = None
        if self.is_main:
            try:
                final = write(rng_ranks=rngs, **parts)
            except Exception as e:  # the other ranks must not wait for a checkpoint that will not come
                failed = e
        if sum_across_ranks([1.0 if failed else 0.0])[0]:
            if failed is not None:
                raise failed
            raise CheckpointError(f"rank 0 could not write checkpoint {final} (its error is in rank 0's output)")
        return final


class FSDP2(DataParallel):
    """Sharded processes (:class:`~ogls_sd.sharding.Sharding`): a step runs gathered, the
    gradients are reduce-scattered into the shards (a LoRA adapter, replicated, is summed), and
    checkpoints hold the gathered full weights plus every process's optimizer / EMA shards."""

    sharded = True

    def __init__(self, accel, shard: Sharding):
        super().__init__(accel)
        self.shard = shard

    def step_scope(self):
        return self.shard.gathered()  # gathered until the gradients are reduce-scattered

    def prepare_optimizer(self, opt):
        return opt

    def begin_pass(self) -> None:
        self.shard.gather()

    def reduce(self, params: list, finite: bool) -> None:
        # every rank reduce-scatters (also a step about to be skipped)
        self.shard.reduce_gradients()
        self.shard.release()
        super().reduce(params, finite)

    def clip(self, params: list, max_norm: float) -> float:
        return clip_grad_norm(params, max_norm)

    def collective_parts(self, final: Path, opt, teacher) -> dict:
        full_sd = self.shard.full_state_dict() if self.shard.sharded_trainable else None
        sharded_dir = final.parent / f"{final.name}.sharded.tmp"
        if self.is_main:
            shutil.rmtree(sharded_dir, ignore_errors=True)
        barrier()
        try:
            self.shard.save_sharded(sharded_dir, opt, teacher)  # collective: fails on every process together
        except CheckpointError:
            if self.is_main:  # a full disk keeps nothing half-written
                shutil.rmtree(sharded_dir, ignore_errors=True)
            raise
        barrier()
        return {"state_dict": full_sd, "sharded_dir": sharded_dir}

    def restore_optimizer(self, ckpt: Path, state: dict, opt, teacher) -> None:
        # optimizer (and EMA copy) shards: torch.distributed.checkpoint
        if not (ckpt / SHARDED).is_dir():
            raise CheckpointError(f"{ckpt}: no {SHARDED}/ directory (not written by a train.fsdp run)")
        with restoring(ckpt / SHARDED, "sharded optimizer / EMA teacher state"):
            self.shard.load_sharded(ckpt / SHARDED, opt, teacher)

    def ema_in_shards(self, teacher) -> bool:
        return teacher.copy is not None


def choose_parallelism(accel, fsdp: bool, policy=None, teacher=None, cfg: Config | None = None) -> Parallelism:
    """The strategy of this launch: FSDP2 when ``fsdp`` (the policy and ``teacher``'s copy are then
    sharded here, so ``policy``, ``teacher`` and ``cfg`` are needed), data parallel with several
    processes, else one process."""
    if fsdp:
        return FSDP2(accel, Sharding(policy, teacher.copy, lora=cfg.model.lora, mixed_precision=cfg.train.mixed_precision))
    return DataParallel(accel) if world()[1] > 1 else SingleProcess(accel)


def for_sharding(accel, shard: Sharding | None) -> Parallelism:
    """The strategy around an existing :class:`~ogls_sd.sharding.Sharding` (None: not sharded),
    for callers that built the sharding themselves (:func:`~ogls_sd.trainer.optimize`)."""
    return FSDP2(accel, shard) if shard is not None else choose_parallelism(accel, False)
