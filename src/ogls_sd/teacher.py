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

from .modeling import SeqBatch, completion_hidden, lm_head

KINDS = ("frozen", "ema", "live")


class Teacher:
    """The teacher weights of a run.

    Args:
        policy: the trained model (a peft model when ``lora``).
        kind: ``frozen`` | ``ema`` | ``live`` (``teacher.kind`` already resolved, see
            :meth:`ogls_sd.config.TeacherConfig.resolve`).
        ema_decay: ``φ ← decay·φ + (1 − decay)·θ`` after every optimizer step (``ema`` only).
        lora: the policy trains a LoRA adapter.
    """

    def __init__(self, policy: nn.Module, kind: str = "frozen", ema_decay: float = 0.999, lora: bool = False):
        if kind not in KINDS:
            raise ValueError(f"teacher.kind: {kind!r} not in {', '.join(KINDS)}")
        self.policy, self.kind, self.decay, self.lora = policy, kind, ema_decay, lora
        self.copy: nn.Module | None = None
        self.adapter_ema: dict[str, Tensor] | None = None  # LoRA + ema: name -> EMA of a trainable tensor
        if kind == "ema" and lora:
            if not hasattr(policy, "disable_adapter"):
                raise ValueError("teacher.kind=ema with model.lora=true needs a peft model (no adapter to average)")
            self.adapter_ema = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        elif kind == "ema" or (kind == "frozen" and not lora):
            self.copy = copy.deepcopy(policy).eval()
            self.copy.requires_grad_(False)

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        """The network that plays the teacher, ready for a no-grad forward."""
        if self.copy is not None:
            yield self.copy
        elif self.kind == "frozen":  # LoRA: adapter disabled
            with self.policy.disable_adapter():
                yield self.policy
        elif self.adapter_ema is not None:  # LoRA + ema: point the adapter at the EMA tensors, then back
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
        else:
            yield self.policy

    @torch.no_grad()
    def hidden(self, batch: SeqBatch, pad_id: int, micro_batch: int = 64) -> Tensor:
        """Teacher hidden states at completion positions, ``[batch.rows, H]``."""
        with self.module() as m:
            was = m.training
            m.eval()
            try:
                return completion_hidden(m, batch, pad_id, micro_batch)
            finally:
                m.train(was)

    def head(self) -> tuple[Tensor, Tensor | None]:
        """Teacher lm head ``(W [V, H], b)``, detached (cloned while an EMA adapter is swapped in)."""
        with self.module() as m:
            w, b = lm_head(m)
            w, b = w.detach(), (b.detach() if b is not None else None)
            if self.adapter_ema is not None:  # the swap is undone on exit: keep the EMA values
                w, b = w.clone(), (b.clone() if b is not None else None)
        return w, b

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ``φ ← decay·φ + (1 − decay)·θ`` for ``ema``; no-op otherwise."""
        if self.kind != "ema":
            return
        if self.adapter_ema is not None:
            params = dict(self.policy.named_parameters())
            for n, v in self.adapter_ema.items():
                v.mul_(self.decay).add_(params[n].detach().to(v.dtype), alpha=1.0 - self.decay)
            return
        for pt, ps in zip(self.copy.parameters(), self.policy.parameters()):
            pt.mul_(self.decay).add_(ps.detach().to(pt.dtype), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor] | None:
        """The EMA weights (saved in checkpoints); None for other kinds (frozen is reproducible from θ₀).

        Tensors that share storage (tied input/output embeddings) are cloned, so that the dict can
        be written with safetensors, which refuses shared tensors; loading it back re-ties nothing
        and needs nothing re-tied (both keys hold the same values).
        """
        if self.kind != "ema":
            return None
        if self.adapter_ema is not None:
            return {n: v.contiguous() for n, v in self.adapter_ema.items()}
        out, seen = {}, set()
        for k, v in self.copy.state_dict().items():
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        if self.kind != "ema":
            return
        if self.adapter_ema is not None:
            missing = set(self.adapter_ema) - set(sd)
            if missing:
                raise ValueError(f"EMA adapter state lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
            for n in self.adapter_ema:
                self.adapter_ema[n].copy_(sd[n])
            return
        self.copy.load_state_dict(sd)
