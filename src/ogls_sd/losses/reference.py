"""Plain full-vocabulary implementation of the distillation loss: the reference.

It materialises ``[N, V]`` logits for the student and every teacher input at once. The chunked
implementation (``losses/chunked.py``) must reproduce its values and gradients; tests compare them.

Interface shared by both implementations::

    distill_loss(student_hidden [N, H], student_weight [V, H], student_bias [V] | None,
                 target: TeacherTarget, spec: DivergenceSpec, row_weight [N],
                 target_ids [N] | None) -> DistillOutput

``loss = Σ_r row_weight[r] · D_r`` where ``D_r`` is the (clipped) divergence of row ``r``.
``row_weight`` carries masking, gating and the reduction: for ``token_mean`` it is
``1 / (number of valid distilled tokens in the whole global batch)``, so summing the losses of all
micro-batches and ranks gives the gradient of one big batch.

Precision: the softmax and divergence math runs in float32 at least (:func:`compute_dtype`),
whatever the model dtype: with bf16/fp16 inputs the student and teacher inputs (hidden states,
lm heads, biases) are upcast first, so the logits too are float32 GEMMs (a float32 copy of the lm
heads: the reference is the memory-hungry implementation anyway). The loss and the stats are
float32; autograd casts the gradients back to the input dtypes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .divergence import DivergenceSpec, divergence_rows
from .target import TeacherTarget, lm_logits, steered_logits


@dataclass
class DistillOutput:
    """``loss``: scalar with grad. ``stats``: detached per-row ``[N]`` tensors:
    ``kl`` (unclipped forward KL(p̃‖p_S)), ``clipped`` (clipped entries or rows), ``vocab``
    (entries per row the clip could act on), ``teacher_entropy``, ``student_entropy``,
    ``steer_rms`` (RMS of the applied direction d)."""

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the softmax/divergence math: the widest of ``dtypes`` and float32."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def upcast_target(tgt: TeacherTarget, dtype: torch.dtype) -> TeacherTarget:
    """``tgt`` with its floating tensors cast to ``dtype`` (unchanged when they already have it)."""

    def up(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    names = ("weight", "bias", "anchor_hidden", "anchor_scale", "pos_hidden", "neg_hidden", "direction", "strength")
    changes = {k: up(getattr(tgt, k)) for k in names}
    if all(changes[k] is getattr(tgt, k) for k in names):
        return tgt
    return dataclasses.replace(tgt, **changes)


def _entropy(logp: Tensor) -> Tensor:
    p = logp.exp()
    return -(p * torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)).sum(-1)


def row_stats(t_logp: Tensor, s_logp: Tensor, clipped: Tensor, steer_rms: Tensor, spec: DivergenceSpec) -> dict[str, Tensor]:
    """Detached per-row diagnostics shared by both implementations."""
    with torch.no_grad():
        p_t = t_logp.exp()
        kl = (p_t * torch.where(torch.isneginf(t_logp), torch.zeros_like(t_logp), t_logp - s_logp)).sum(-1)
        if spec.clip == "entry":
            V = t_logp.shape[-1]
            width = spec.top_k + 1 if spec.divergence == "topk" and spec.top_k < V else V
        else:
            width = 1
        return {
            "kl": kl,
            "clipped": clipped.detach(),
            "vocab": torch.full_like(kl, float(width)),
            "teacher_entropy": _entropy(t_logp),
            "student_entropy": _entropy(s_logp.detach()),
            "steer_rms": steer_rms,
        }


def distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    target: TeacherTarget,
    spec: DivergenceSpec,
    row_weight: Tensor,
    target_ids: Tensor | None = None,
) -> DistillOutput:
    """Reference distillation loss; see the module docstring for the contract."""
    T = spec.temperature
    dtype = compute_dtype(student_hidden.dtype, target.weight.dtype)
    with torch.no_grad():
        z, steer_rms = steered_logits(upcast_target(target, dtype))
        t_logp = torch.log_softmax(z / T, -1)
    up = (lambda t: t.to(dtype) if t is not None and t.dtype != dtype else t)
    s_logp = torch.log_softmax(lm_logits(up(student_hidden), up(student_weight), up(student_bias)) / T, -1)
    value, clipped = divergence_rows(t_logp, s_logp, spec, target_ids)
    loss = (value * row_weight.to(value.dtype)).sum()
    return DistillOutput(loss, row_stats(t_logp, s_logp, clipped, steer_rms, spec))


def token_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(h W^T + b)/T`` gathered at ``ids``: ``[N]`` (with grad)."""
    logp = torch.log_softmax(lm_logits(hidden, weight, bias) / temperature, -1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
