"""Per-position divergences between teacher and student next-token distributions.

Pure tensor math on log-probabilities; no models. All functions take rows of log-probs
``t_logp, s_logp: [N, V]`` (already temperature-scaled and log-softmaxed) and return a per-row
divergence ``[N]``. Conventions (method.md §1):

* forward KL ``Σ_v p_T (log p_T − log p_S)``; clip ``entry`` clamps each summand at τ before the
  sum, ``token`` clamps the per-row sum, ``none`` does nothing. A clipped value can be negative.
  ``safe`` rescales the row instead of clamping it: ``L = sg(α)·D`` with ``α = min(1, τ/D)``
  (``α = 1`` when ``D ≤ τ``), so the value is ``min(D, τ)`` and the gradient is the unclipped one
  times ``α > 0`` (never zero, never sign-flipped; method.md §1). ``token`` and ``safe`` apply to
  every divergence (the row value ``D``).
* generalized JSD in **TRL's convention**: ``m = β p_T + (1−β) p_S``,
  ``JSD_β = β KL(p_T‖m) + (1−β) KL(p_S‖m)``; β = 0 is forward ``KL(p_T‖p_S)``, β = 1 is reverse
  ``KL(p_S‖p_T)`` (special-cased: the interior formula degenerates to 0 at the ends).
* sampled-token: ``A_t = sg(log p_T(y_t) − log p_S(y_t))``, loss ``−A_t log p_S(y_t)``.
* top-k: the teacher's top-k tokens plus one tail bucket holding the remaining mass; forward KL
  over the k+1 buckets (the entry clip then acts per bucket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_token", "topk")
CLIPS = ("none", "entry", "token", "safe")


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence, with its options. Mirrors the ``loss`` config section."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    top_k: int = 20
    clip: str = "none"
    clip_tau: float = 0.05
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"loss.divergence: {self.divergence!r} not in {DIVERGENCES}")
        if self.clip not in CLIPS:
            raise ValueError(f"loss.clip: {self.clip!r} not in {CLIPS}")
        if self.clip == "entry" and self.divergence not in ("forward_kl", "topk"):
            raise ValueError("loss.clip=entry clamps forward-KL summands: use it with divergence forward_kl or topk")
        if self.clip == "safe" and not self.clip_tau > 0:
            raise ValueError(f"loss.clip=safe needs clip_tau > 0 (its gradient scale is tau / D), got {self.clip_tau}")
        if self.divergence == "topk" and self.top_k < 1:
            raise ValueError(f"loss.top_k: must be >= 1, got {self.top_k}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"loss.beta: must be in [0, 1], got {self.beta}")


def _xlogy_diff(logp: Tensor, logq: Tensor) -> Tensor:
    """Summands p (log p − log q), with 0 where p == 0 (log p = -inf)."""
    p = logp.exp()
    diff = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp - logq)
    return p * diff


def safe_scale(value: Tensor, tau: float) -> Tensor:
    """The ``safe`` clip's per-row scale ``α = min(1, τ / D)`` (1 where ``D ≤ τ``), detached."""
    with torch.no_grad():
        over = value > tau
        return torch.where(over, tau / torch.where(over, value, torch.ones_like(value)), torch.ones_like(value))


def clip_rows(value: Tensor, clip: str, tau: float) -> tuple[Tensor, Tensor]:
    """Row clip of per-row values ``[N]`` for ``token`` / ``safe`` (identity otherwise).

    ``token``: ``min(D, τ)`` (zero gradient on clamped rows). ``safe``: ``sg(α)·D`` with
    ``α = min(1, τ/D)``: the same value, the unclipped gradient scaled by ``α > 0``.
    Returns ``(value [N], clipped [N] 0/1)``.
    """
    if clip == "token":
        over = value > tau
        return torch.clamp(value, max=tau), over.to(value.dtype)
    if clip == "safe":
        over = value > tau
        return value * safe_scale(value, tau), over.to(value.dtype)
    return value, torch.zeros_like(value)


def clip_sum(summands: Tensor, clip: str, tau: float) -> tuple[Tensor, Tensor]:
    """Reduce summands ``[N, K]`` over the last dim with the clip rule.

    Returns ``(value [N], clipped_count [N])``; ``clipped_count`` counts clamped entries (``entry``)
    or clamped/rescaled rows (``token``, ``safe``: 0/1).
    """
    if clip == "entry":
        over = summands > tau
        return torch.clamp(summands, max=tau).sum(-1), over.sum(-1).to(summands.dtype)
    return clip_rows(summands.sum(-1), clip, tau)


def forward_kl(t_logp: Tensor, s_logp: Tensor, clip: str = "none", tau: float = 0.05) -> tuple[Tensor, Tensor]:
    """Clipped forward KL per row: ``([N], clipped_count [N])``."""
    return clip_sum(_xlogy_diff(t_logp, s_logp), clip, tau)


def reverse_kl(t_logp: Tensor, s_logp: Tensor) -> Tensor:
    """``KL(p_S ‖ p_T)`` per row ``[N]``."""
    return _xlogy_diff(s_logp, t_logp).sum(-1)


def generalized_jsd(t_logp: Tensor, s_logp: Tensor, beta: float) -> Tensor:
    """Generalized JSD in TRL's convention (see module docstring); ``[N]``."""
    if beta == 0.0:
        return _xlogy_diff(t_logp, s_logp).sum(-1)
    if beta == 1.0:
        return reverse_kl(t_logp, s_logp)
    log_m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))
    kl_t = _xlogy_diff(t_logp, log_m).sum(-1)
    kl_s = _xlogy_diff(s_logp, log_m).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def topk_buckets(t_logp: Tensor, s_logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Log-probs over the teacher's top-k tokens plus a tail bucket: ``([N, k+1], [N, k+1])``.

    The tail's log-mass is a logsumexp over the tokens outside the top-k (not ``log(1 − Σ top)``,
    whose cancellation turns a small tail into rounding noise, or into ``log 0``, in float32).
    With ``k >= V`` every token is its own bucket and there is no tail: ``([N, V], [N, V])``.
    """
    if k >= t_logp.shape[-1]:
        return t_logp, s_logp
    idx = t_logp.topk(k, dim=-1).indices
    t_top = t_logp.gather(-1, idx)
    s_top = s_logp.gather(-1, idx)

    def tail(logp: Tensor) -> Tensor:
        return torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1, keepdim=True)

    return torch.cat([t_top, tail(t_logp)], -1), torch.cat([s_top, tail(s_logp)], -1)


def sampled_token_loss(t_tok_logp: Tensor, s_tok_logp: Tensor) -> Tensor:
    """On-policy distillation as RL: ``−sg(log p_T(y) − log p_S(y)) · log p_S(y)``; ``[N]``."""
    adv = (t_tok_logp - s_tok_logp).detach()
    return -adv * s_tok_logp


def divergence_rows(
    t_logp: Tensor, s_logp: Tensor, spec: DivergenceSpec, target_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row loss value and clipped count for ``spec``.

    Args:
        t_logp: ``[N, V]`` teacher log-probs (no grad expected).
        s_logp: ``[N, V]`` student log-probs (carries the gradient).
        target_ids: ``[N]`` sampled tokens, needed for ``sampled_token``.
    Returns:
        ``(value [N], clipped_count [N])``.
    """
    d = spec.divergence
    if d == "forward_kl":
        return forward_kl(t_logp, s_logp, spec.clip, spec.clip_tau)
    if d == "topk":
        tb, sb = topk_buckets(t_logp, s_logp, spec.top_k)
        return forward_kl(tb, sb, spec.clip, spec.clip_tau)
    if d == "reverse_kl":
        v = reverse_kl(t_logp, s_logp)
    elif d == "jsd":
        v = generalized_jsd(t_logp, s_logp, spec.beta)
    elif d == "sampled_token":
        if target_ids is None:
            raise ValueError("divergence=sampled_token needs target_ids")
        ids = target_ids.unsqueeze(-1)
        v = sampled_token_loss(t_logp.gather(-1, ids).squeeze(-1), s_logp.gather(-1, ids).squeeze(-1))
    else:  # pragma: no cover - guarded by DivergenceSpec
        raise ValueError(d)
    return clip_rows(v, spec.clip, spec.clip_tau)
