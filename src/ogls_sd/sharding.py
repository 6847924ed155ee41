"""FSDP2 sharding (``train.fsdp=true``, or an ``accelerate`` FSDP config): parameters, gradients,
optimizer state and the EMA / frozen teacher copy sharded across ranks at rest; gathered for the
compute of one step.

How a step runs (the trainer, :func:`~ogls_sd.trainer.optimize` and :class:`~ogls_sd.parallel.FSDP2`)::

    shard.gather()            # all-gather every unit (decoder layer, root): one collective per unit
    rollouts, plan, loss terms, backward per micro-batch     # local: no collective, any count per rank
    shard.reduce_gradients()  # one zero-weight pass with gradient sync on: reduce-scatter (sum)
    shard.release()           # free the gathered parameters; only the shards remain
    clip, optimizer step, teacher update                     # on the shards

Why gathered for the whole step: the algorithms' teacher passes (contexts, pools, anchors) and the
micro-batches differ in number between ranks (each rank owns different prompt groups), and a
per-layer all-gather inside each forward would need every rank to run the same sequence of forward
passes. So the parameters are unsharded once per step (FSDP2's public ``unshard`` with
``reshard_after_forward`` / ``reshard_after_backward`` off, as for evaluation), gradients accumulate
locally without communication (``set_requires_gradient_sync(False)``, FSDP2's ``no_sync``), and one
identical zero-weight forward/backward on every rank then reduce-scatters the accumulated
gradients (divide factor 1: a sum, like the data-parallel path, whose loss normalisers are already
global). What is sharded at rest is what dominates memory for full fine-tuning: the fp32 master
weights, gradients and AdamW moments (16 bytes/parameter divided by the number of ranks) and the
teacher copy's master weights; a step holds one gathered copy of the policy (and of the teacher
copy) in the compute dtype. docs/scaling.md has the arithmetic.

With LoRA the base weights are sharded (frozen, no gradients), and the adapter stays replicated
(FSDP2's ``ignored_params``): its gradients are summed like the data-parallel path's, and the LoRA
EMA teacher swaps adapter tensors as without sharding.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .modeling import unwrap


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM (``model.model.layers`` for Llama / Qwen / SmolLM)."""
    dec = unwrap(model).get_decoder()
    layers = getattr(dec, "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"train.fsdp: cannot find the decoder layers of {type(unwrap(model)).__name__} "
                         "(expected model.get_decoder().layers)")
    return list(layers)


def mixed_precision_policy(mixed_precision: str):
    """``train.mixed_precision`` as an FSDP2 policy: bf16 / fp16 parameters for compute, fp32 gradient
    reduction; ``no``: the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "no":
        return MixedPrecisionPolicy()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)


def shard_module(model: nn.Module, mixed_precision: str = "no", ignored: set[nn.Parameter] | None = None) -> list:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, lm head).
    Returns the FSDP units, root last. ``ignored`` parameters stay replicated."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(mixed_precision)
    ignored = set(ignored or ())
    units = []
    for layer in decoder_layers(model):
        own = {p for p in layer.parameters() if p in ignored}
        units.append(fully_shard(layer, mp_policy=mp, ignored_params=own or None))
    units.append(fully_shard(model, mp_policy=mp, ignored_params=ignored or None))
    for u in units:
        u.set_gradient_divide_factor(1.0)  # a sum over ranks: the loss normalisers are global
        u.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return units


class Sharding:
    """The FSDP2 state of a run: the policy's units and the teacher copy's units.

    Args:
        policy: the trained model (a peft model with LoRA), unsharded, on its device.
        teacher_copy: the frozen / EMA teacher's separate copy, or None.
        lora: the policy trains a LoRA adapter (kept replicated).
        mixed_precision: ``train.mixed_precision``.
    """

    def __init__(self, policy: nn.Module, teacher_copy: nn.Module | None = None, lora: bool = False,
                 mixed_precision: str = "no"):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("train.fsdp needs a torch.distributed process group (launch with accelerate or torchrun)")
        self.policy, self.lora = policy, lora
        ignored = {p for p in policy.parameters() if p.requires_grad} if lora else set()
        self.units = shard_module(policy, mixed_precision, ignored)
        # anything trainable in the shards (full fine-tuning); with LoRA only the replicated adapter
        self.sharded_trainable = any(p.requires_grad and is_sharded(p) for p in policy.parameters())
        self.teacher_units = shard_module(teacher_copy, mixed_precision) if teacher_copy is not None else []
        self._gathered = False
        for mod in (policy, teacher_copy):
            if mod is not None:
                _lazy_init(mod)
        for u in self.all_units:  # FSDP2 keeps the root gathered after a forward: shards only at rest
            u.reshard()
        # Every forward / backward runs between gather() and release(): no unit reshards on its own,
        # and gradients accumulate locally until reduce_gradients() turns the sync on for one pass.
        for root in (self.units[-1], *self.teacher_units[-1:]):
            root.set_reshard_after_forward(False)
            root.set_reshard_after_backward(False)
        self.units[-1].set_requires_gradient_sync(False)

    @property
    def all_units(self) -> list:
        return self.units + self.teacher_units

    # ------------------------------------------------------------------ the step's bracket
    def gather(self) -> None:
        """All-gather every unit (a collective: every rank calls it, in the same order) and keep the
        parameters unsharded through any number of forward / backward passes, with gradients
        accumulating locally."""
        if self._gathered:
            return
        for u in self.all_units:
            u.unshard()
        self._gathered = True

    def reduce_gradients(self) -> None:
        """Reduce-scatter (sum) the gradients accumulated since :meth:`gather` into the shards: one
        zero-weight forward/backward through the policy, identical on every rank. Collective."""
        if not self._gathered:
            raise RuntimeError("reduce_gradients outside gather()")
        if not self.sharded_trainable:
            return  # LoRA: nothing trainable is sharded (the adapter is summed like data parallel)
        self.units[-1].set_requires_gradient_sync(True)
        try:
            dec = unwrap(self.policy).get_decoder()
            dev = next(self.policy.parameters()).device
            ids = torch.zeros((1, 1), dtype=torch.long, device=dev)
            h = dec(input_ids=ids, use_cache=False).last_hidden_state
            (h.sum() * 0.0).backward()
        finally:
            self.units[-1].set_requires_gradient_sync(False)

    def release(self) -> None:
        """Free the gathered parameters (the shards stay): before the optimizer step."""
        if not self._gathered:
            return
        for u in self.all_units:
            u.reshard()
        self._gathered = False

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """:meth:`gather` … :meth:`release` (leaves the parameters as it found them)."""
        was = self._gathered
        self.gather()
        try:
            yield
        finally:
            if not was:
                self.release()

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on CPU (on rank 0; an empty dict on the others). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _sharded_state(self, optimizer, teacher) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        st = {"optimizer": get_optimizer_state_dict(self.policy, optimizer)}
        if teacher is not None and teacher.has_state and teacher.copy is not None:
            st["ema"] = teacher.copy.state_dict()
        return st

    def save_sharded(self, path, optimizer, teacher) -> None:
        """The optimizer shards (and the EMA teacher copy's) with ``torch.distributed.checkpoint``:
        every rank writes its own shards under ``path``. Collective."""
        import torch.distributed.checkpoint as dcp

        with dcp_errors(path, "writing the sharded optimizer / EMA state to"):
            dcp.save(self._sharded_state(optimizer, teacher), checkpoint_id=str(path))

    def load_sharded(self, path, optimizer, teacher) -> None:
        """Inverse of :meth:`save_sharded`, in place. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        st = self._sharded_state(optimizer, teacher)
        with dcp_errors(path, "reading the sharded optimizer / EMA state from"):
            dcp.load(st, checkpoint_id=str(path))
        set_optimizer_state_dict(self.policy, optimizer, st["optimizer"])
        if "ema" in st:
            teacher.copy.load_state_dict(st["ema"])


@contextlib.contextmanager
def dcp_errors(path, action: str) -> Iterator[None]:
    """``torch.distributed.checkpoint`` reports every rank's failure as one ``CheckpointException``,
    a ``BaseException`` that ``except Exception`` never sees (each rank then printed hundreds of
    lines): turn it into a one-line :class:`~ogls_sd.checkpoint.CheckpointError` naming ``path``
    ("no space left on device" when a rank ran out of disk)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        raise dcp_failure(path, action, e) from None


def dcp_failure(path, action: str, e: BaseException) -> Exception:
    """The one-line error for a failed sharded read or write (see :func:`dcp_errors`)."""
    from .checkpoint import CheckpointError, describe_failure, write_failure

    failures = getattr(e, "failures", None) or {}
    inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    inner = [x for x in inner if isinstance(x, BaseException)] or [e]
    ranks = ", ".join(map(str, sorted(failures))) or "?"
    why = next((w for w in map(write_failure, inner) if w is not None), None)
    if why is not None:
        return CheckpointError(f"{action} {path}: {why} (process(es) {ranks})")
    return CheckpointError(f"{action} {path} failed on process(es) {ranks} ({describe_failure(inner[0])})")


def _lazy_init(model: nn.Module) -> None:
    """Run one tiny forward through the root so that FSDP2 takes it as the root of its units (the
    algorithms call the decoder directly, never the root)."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev), use_cache=False)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over sharded and replicated gradients; the total norm as
    a float (the same on every rank). ``max_norm <= 0``: the norm only."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        gn = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    else:
        gn = torch.nn.utils.get_total_norm(grads)
    if is_sharded(gn):
        gn = gn.full_tensor()
    return float(gn)
