"""Teacher weights φ: ``frozen`` (θ₀), ``ema`` (moving average of θ) or ``live`` (θ, detached).

With LoRA, ``frozen`` is the policy with its adapter disabled (no second copy in memory). With full
fine-tuning, ``frozen`` and ``ema`` keep a separate copy that never requires grad. The teacher only
*scores* sequences, always under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from .modeling import SeqBatch, completion_hidden, lm_head


class Teacher:
    def __init__(self, policy: nn.Module, kind: str = "frozen", ema_decay: float = 0.999, lora: bool = False):
        if kind not in ("frozen", "ema", "live"):
            raise ValueError(f"teacher.kind: {kind!r} not in frozen, ema, live")
        self.policy, self.kind, self.decay, self.lora = policy, kind, ema_decay, lora
        self.copy: nn.Module | None = None
        if kind == "ema" or (kind == "frozen" and not lora):
            src = policy
            if lora and kind == "ema":
                raise ValueError("teacher.kind=ema with LoRA is not supported: use frozen (adapter disabled) or live")
            self.copy = copy.deepcopy(src).eval()
            self.copy.requires_grad_(False)

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        """The network that plays the teacher, ready for a no-grad forward."""
        if self.copy is not None:
            yield self.copy
        elif self.kind == "frozen":  # LoRA: adapter disabled
            with self.policy.disable_adapter():
                yield self.policy
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
        """Teacher lm head ``(W [V, H], b)``, detached."""
        with self.module() as m:
            w, b = lm_head(m)
        return w.detach(), (b.detach() if b is not None else None)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ``φ ← decay·φ + (1 − decay)·θ`` for ``ema``; no-op otherwise."""
        if self.kind != "ema":
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
        out, seen = {}, set()
        for k, v in self.copy.state_dict().items():
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        if self.kind == "ema":
            self.copy.load_state_dict(sd)
