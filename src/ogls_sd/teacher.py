"""Teacher weights φ: ``frozen`` (θ₀), ``ema`` (moving average of θ) or ``live`` (θ, detached).

For OGLS-SD the teacher weights are the weights of the **anchor** ``z0`` and of the context passes
(docs/algorithms/ogls_sd.md, "The anchor"); for OPSD they are the privileged teacher's.

* Full fine-tuning: ``frozen`` and ``ema`` keep a separate copy that never requires grad; ``live``
  is the policy itself (no copy).
* LoRA: ``frozen`` is the policy with its adapter disabled (no copy), ``live`` the policy with its
  adapter enabled, and ``ema`` keeps an EMA of the **adapter** weights only (a few MB), swapped into
  the adapter for the duration of a teacher pass and swapped back afterwards.

The teacher only *scores* sequences, always under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from .modeling import SeqBatch, can_share_prefixes, completion_hidden, lm_head, prefix_shared_hidden, repeats_a_prefix

KINDS = ("frozen", "ema", "live")


def teacher_class(kind: str, lora: bool) -> type["Teacher"]:
    """The one place that reads ``teacher.kind``: the class of the teacher weights of a run."""
    if kind not in KINDS:
        raise ValueError(f"teacher.kind: {kind!r} not in {', '.join(KINDS)}")
    if kind == "live":
        return LiveTeacher
    if kind == "frozen":
        return AdapterOffTeacher if lora else FrozenCopyTeacher
    return EMAAdapterTeacher if lora else EMACopyTeacher


class Teacher:
    """The teacher weights of a run; ``Teacher(policy, kind, ema_decay, lora)`` builds the class
    :func:`teacher_class` picks. The interface every kind implements:

    * :meth:`module` — the network that plays the teacher, for a no-grad forward;
    * :meth:`update` — after each optimizer step (an EMA moves; the others do nothing);
    * :meth:`state_dict` / :meth:`load_state_dict` — what a checkpoint must hold to resume exactly
      (``None``: nothing, the kind is reproducible from θ₀ or θ);
    * ``copy`` — a separate module that FSDP2 shards beside the policy (``None``: the teacher is the
      policy itself, sharded with it).

    Args:
        policy: the trained model (a peft model when ``lora``).
        kind: ``frozen`` | ``ema`` | ``live`` (``teacher.kind`` already resolved, see
            :meth:`ogls_sd.config.TeacherConfig.resolve`).
        ema_decay: ``φ ← decay·φ + (1 − decay)·θ`` after every optimizer step (``ema`` only).
        lora: the policy trains a LoRA adapter.
    """

    kind = ""
    copy: nn.Module | None = None
    has_state = False  # state_dict() returns tensors that a checkpoint must keep

    def __new__(cls, policy: nn.Module, kind: str = "frozen", ema_decay: float = 0.999, lora: bool = False):
        return super().__new__(teacher_class(kind, lora) if cls is Teacher else cls)

    def __init__(self, policy: nn.Module, kind: str = "frozen", ema_decay: float = 0.999, lora: bool = False):
        self.policy, self.decay, self.lora = policy, ema_decay, lora

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        """The network that plays the teacher, ready for a no-grad forward."""
        yield self.policy

    @torch.no_grad()
    def hidden(self, batch: SeqBatch, pad_id: int, micro_batch: int = 64, prefix_cache_tokens: int = 0) -> Tensor:
        """Teacher hidden states at completion positions, ``[batch.rows, H]``: ``micro_batch``
        sequences per forward, or, when ``prefix_cache_tokens > 0`` and sequences share a prefix,
        each distinct prefix encoded once and its key/value cache reused (passes of at most
        ``prefix_cache_tokens`` cached + new tokens, :func:`~ogls_sd.modeling.prefix_shared_hidden`).
        Both passes run on the same teacher module."""
        with self.module() as m:
            was = m.training
            m.eval()
            try:
                if prefix_cache_tokens > 0 and repeats_a_prefix(batch) and can_share_prefixes(m):
                    return prefix_shared_hidden(m, batch, pad_id, prefix_cache_tokens)
                return completion_hidden(m, batch, pad_id, micro_batch)
            finally:
                m.train(was)

    def head(self) -> tuple[Tensor, Tensor | None]:
        """Teacher lm head ``(W [V, H], b)``, detached."""
        with self.module() as m:
            w, b = lm_head(m)
            return w.detach(), (b.detach() if b is not None else None)

    def update(self) -> None:
        """After an optimizer step (no-op unless the kind moves)."""

    def state_dict(self) -> dict[str, Tensor] | None:
        """What a checkpoint keeps of the teacher; None: nothing (reproducible from θ₀ or θ)."""
        return None

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (no-op for kinds without state)."""


class LiveTeacher(Teacher):
    """``live``: the current policy θ (detached; with LoRA, the adapter enabled). No copy."""

    kind = "live"


class FrozenCopyTeacher(Teacher):
    """``frozen``, full fine-tuning: a copy of θ₀ that never requires grad."""

    kind = "frozen"

    def __init__(self, policy: nn.Module, kind: str = "frozen", ema_decay: float = 0.999, lora: bool = False):
        super().__init__(policy, kind, ema_decay, lora)
        self.copy = copy.deepcopy(policy).eval()
        self.copy.requires_grad_(False)

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        yield self.copy


class AdapterOffTeacher(Teacher):
    """``frozen`` with LoRA: the policy with its adapter disabled (θ₀ without a second copy)."""

    kind = "frozen"

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        with self.policy.disable_adapter():
            yield self.policy


class EMACopyTeacher(FrozenCopyTeacher):
    """``ema``, full fine-tuning: a copy moved toward θ after every optimizer step; its weights are
    part of every checkpoint."""

    kind = "ema"
    has_state = True

    @torch.no_grad()
    def update(self) -> None:
        """``φ ← decay·φ + (1 − decay)·θ``."""
        for pt, ps in zip(self.copy.parameters(), self.policy.parameters()):
            pt.mul_(self.decay).add_(ps.detach().to(pt.dtype), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The EMA weights. Tensors that share storage (tied input/output embeddings) are cloned, so
        that the dict can be written with safetensors, which refuses shared tensors; loading it back
        re-ties nothing and needs nothing re-tied (both keys hold the same values)."""
        out, seen = {}, set()
        for k, v in self.copy.state_dict().items():
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self.copy.load_state_dict(sd)


class EMAAdapterTeacher(Teacher):
    """``ema`` with LoRA: an EMA of the **adapter** weights only (a few MB), swapped into the
    adapter for the duration of a teacher pass and swapped back afterwards."""

    kind = "ema"
    has_state = True

    def __init__(self, policy: nn.Module, kind: str = "ema", ema_decay: float = 0.999, lora: bool = True):
        super().__init__(policy, kind, ema_decay, lora)
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("teacher.kind=ema with model.lora=true needs a peft model (no adapter to average)")
        self.adapter_ema = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        # ``.data`` is swapped, not copied into: an in-place write would bump the parameters'
        # autograd versions and break the student's graph of the same step (backward after it)
        params = dict(self.policy.named_parameters())
        saved = {n: params[n].data for n in self.adapter_ema}
        for n, v in self.adapter_ema.items():
            params[n].data = v
        try:
            yield self.policy
        finally:
            for n, v in saved.items():
                params[n].data = v

    def head(self) -> tuple[Tensor, Tensor | None]:
        w, b = super().head()  # cloned: the swap is undone on exit, keep the EMA values
        return w.clone(), (b.clone() if b is not None else None)

    @torch.no_grad()
    def update(self) -> None:
        params = dict(self.policy.named_parameters())
        for n, v in self.adapter_ema.items():
            v.mul_(self.decay).add_(params[n].detach().to(v.dtype), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {n: v.contiguous() for n, v in self.adapter_ema.items()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        missing = set(self.adapter_ema) - set(sd)
        if missing:
            raise ValueError(f"EMA adapter state lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
        for n in self.adapter_ema:
            self.adapter_ema[n].copy_(sd[n])
