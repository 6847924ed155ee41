"""RLCSD's token-level advantage modulation (THU-BPM/RLCSD, ``compute_policy_loss_rlcsd`` in
``third_party/verl/verl/trainer/ppo/core_algos.py``), as pure tensor functions.

For a target rollout y with GRPO advantage A, one positive context c⁺ and K negative contexts
c⁻_k (all in ONE template, docs/algorithms/rlcsd.md):

    e_t   = log π_T(y_t | x, c⁺, y<t) − log (1/K) Σ_k π_T(y_t | x, c⁻_k, y<t)   (negative_branch=log_mean)
    r_t   = clamp(scale · tanh(e_t / τ), clip_low, clip_high)
    sel_t = |r_t| > δ
    Â_t   = A + sel_t · r_t, clamped to the sign of A (0 where A = 0)
    L     = mean_{t∉sel} ℓ_t(A) + η · mean_{t∈sel} ℓ_t(Â_t)        (two token means, ℓ = PPO clip)

``negative_branch=mean_log`` replaces the log of the mean probability by the mean of the
log-probabilities (OGLS-SD's pooling), for the ablation.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEGATIVE_BRANCHES = ("log_mean", "mean_log")
SQUASHES = ("tanh", "none")


def negative_branch(neg_logp: Tensor, valid: Tensor, mode: str = "log_mean") -> Tensor:
    """The negative branch at each position from ``neg_logp [K, N]`` (log-probs of the sampled
    token under K negative contexts; ``valid [K, N]`` marks real entries).

    ``log_mean``: ``log (1/K_n) Σ_k exp(neg_logp[k, n])`` over the valid k (RLCSD: logsumexp − log K);
    ``mean_log``: ``(1/K_n) Σ_k neg_logp[k, n]``. Every position needs at least one valid entry.
    """
    if mode not in NEGATIVE_BRANCHES:
        raise ValueError(f"rlcsd.negative_branch: {mode!r} not in {', '.join(NEGATIVE_BRANCHES)}")
    valid = valid.to(torch.bool)
    if neg_logp.shape != valid.shape:
        raise ValueError(f"negative_branch: log-probs {tuple(neg_logp.shape)} and mask {tuple(valid.shape)} differ")
    if not bool(valid.any(0).all()):
        raise ValueError("negative_branch: a position without any negative context")
    k = valid.sum(0).to(neg_logp.dtype)
    if mode == "log_mean":
        return torch.logsumexp(neg_logp.masked_fill(~valid, float("-inf")), 0) - torch.log(k)
    return neg_logp.masked_fill(~valid, 0.0).sum(0) / k


def contrast(pos_logp: Tensor, neg_logp: Tensor, valid: Tensor, mode: str = "log_mean") -> Tensor:
    """``e_t = pos_logp[t] − negative_branch(neg_logp, valid, mode)[t]`` → ``[N]``."""
    return pos_logp - negative_branch(neg_logp, valid, mode)


def residual(e: Tensor, scale: float, tau: float, squash: str = "tanh",
             clip_low: float = -2.0, clip_high: float = 2.0) -> Tensor:
    """``r_t = clamp(scale · tanh(e_t / tau), clip_low, clip_high)`` (``squash=none``: ``scale · e_t``
    before the clamp; ``tau`` unused)."""
    if squash not in SQUASHES:
        raise ValueError(f"rlcsd.squash: {squash!r} not in {', '.join(SQUASHES)}")
    s = torch.tanh(e / tau) if squash == "tanh" else e
    return (scale * s).clamp(min=clip_low, max=clip_high)


def gate(r: Tensor, delta: float) -> Tensor:
    """Tokens whose modulation is applied: ``|r_t| > delta`` (bool)."""
    return r.abs() > delta


def modulated_advantage(adv: Tensor, r: Tensor, selected: Tensor, sign_preserving: bool = True) -> Tensor:
    """``A + selected · r``; with ``sign_preserving`` clamped to ``[0, ∞)`` where ``A > 0``, to
    ``(−∞, 0]`` where ``A < 0`` and set to 0 where ``A = 0`` (the verifier keeps the direction).
    Unselected tokens keep ``A``."""
    raw = adv + selected.to(r.dtype) * r
    if not sign_preserving:
        return raw
    return torch.where(adv > 0, raw.clamp_min(0.0), torch.where(adv < 0, raw.clamp_max(0.0), torch.zeros_like(raw)))


def two_path_weights(selected: Tensor, n_selected: float, n_unselected: float, eta: float, dtype=None) -> Tensor:
    """Token weights of the two-path loss: ``eta / n_selected`` on selected tokens, ``1 / n_unselected``
    on the others (0 for a path without tokens). Summed with the per-token losses they give
    ``mean_unselected ℓ + eta · mean_selected ℓ`` over the step."""
    dtype = dtype or torch.float32
    w_sel = eta / n_selected if n_selected > 0 else 0.0
    w_uns = 1.0 / n_unselected if n_unselected > 0 else 0.0
    sel = selected.to(torch.bool)
    return torch.where(sel, torch.full(sel.shape, w_sel, dtype=dtype, device=sel.device),
                       torch.full(sel.shape, w_uns, dtype=dtype, device=sel.device))
