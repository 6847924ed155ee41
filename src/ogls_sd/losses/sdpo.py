"""SDPO's per-token distillation losses (TRL 1.16 ``trl.experimental.sdpo.loss_utils``), tensor math only.

Student logits ``x [N, V]`` (with grad) and teacher logits ``z [N, V]`` (no grad) of the same
completion positions, both already divided by the sampling temperature; ``s = log_softmax(x)``,
``t = log_softmax(z)``. The per-token loss ``ℓ [N]`` of each mode (``sdpo.mode``):

* ``sampled_token`` (TRL's default): ``ℓ = sg(s_y − t_y) · s_y`` at the sampled token ``y``: the
  score-function estimator of the reverse KL ``KL(p_S ‖ p_T)`` (its gradient is
  ``sg(s_y − t_y) ∇ s_y``); needs ``alpha = 1``.
* ``full_logits``: ``D_α(s, t)`` over the whole vocabulary.
* ``topk_logits``: the student's ``k`` largest logits define the support; both distributions are
  restricted to it and renormalised, or (``add_tail``) extended by one bucket holding the rest of
  the mass, then ``D_α``.

``D_α`` is TRL's ``compute_divergence``: ``α = 0`` forward ``KL(p_T ‖ p_S)``, ``α = 1`` reverse
``KL(p_S ‖ p_T)``, otherwise ``α KL(p_T ‖ m) + (1 − α) KL(p_S ‖ m)`` with
``m = α p_T + (1 − α) p_S``: the generalized JSD of :mod:`.divergence` with ``β = α``.

The tail bucket's log-mass is a logsumexp over the tokens outside the support (TRL computes
``log(1 − Σ top)``, clamped at ``Σ top ≤ 1 − 1e-7``): the same value wherever TRL's clamp is
inactive, and no cancellation when the tail is small.

:func:`sdpo_loss` applies the lm heads a block of rows at a time under activation checkpointing,
so no more than one block of ``[rows, V]`` logits is alive, in forward or backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .divergence import generalized_jsd, sampled_token_loss
from .reference import compute_dtype
from .target import lm_logits

MODES = ("sampled_token", "topk_logits", "full_logits")


def topk_support(s_logp: Tensor, t_logp: Tensor, k: int, add_tail: bool) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs on the student's top-``k`` tokens: renormalised to sum to 1,
    or with a tail bucket (``add_tail``) appended: ``([N, k], [N, k])`` or ``([N, k+1], [N, k+1])``."""
    idx = s_logp.detach().topk(k, dim=-1).indices
    s_top, t_top = s_logp.gather(-1, idx), t_logp.gather(-1, idx)
    if not add_tail:
        return s_top.log_softmax(-1), t_top.log_softmax(-1)

    def with_tail(logp: Tensor, top: Tensor) -> Tensor:
        tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1, keepdim=True)
        return torch.cat([top, tail], -1)

    return with_tail(s_logp, s_top), with_tail(t_logp, t_top)


def token_losses(s_logits: Tensor, t_logits: Tensor, ids: Tensor, mode: str, alpha: float = 1.0,
                 top_k: int = 20, add_tail: bool = False) -> Tensor:
    """Per-token SDPO loss ``[N]`` of ``mode`` (see the module docstring) from temperature-scaled
    logits; the gradient flows through ``s_logits`` only."""
    s_logp = torch.log_softmax(s_logits, -1)
    t_logp = torch.log_softmax(t_logits.detach(), -1)
    if mode == "sampled_token":
        if alpha != 1.0:
            raise ValueError(f"sdpo.alpha: mode sampled_token is the reverse KL and needs alpha = 1, got {alpha}")
        col = ids.unsqueeze(-1)
        return sampled_token_loss(t_logp.gather(-1, col).squeeze(-1), s_logp.gather(-1, col).squeeze(-1))
    if mode == "topk_logits":
        s_logp, t_logp = topk_support(s_logp, t_logp, min(top_k, s_logp.shape[-1]), add_tail)
    elif mode != "full_logits":
        raise ValueError(f"sdpo.mode: {mode!r} not in {', '.join(MODES)}")
    return generalized_jsd(t_logp, s_logp, alpha)


def row_stats(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """Per-row diagnostics over the full vocabulary, ``[4, N]`` (no grad): forward
    ``KL(p_T ‖ p_S)``, reverse ``KL(p_S ‖ p_T)``, teacher entropy, student entropy."""
    s_logp, t_logp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    p_s, p_t = s_logp.exp(), t_logp.exp()
    return torch.stack([(p_t * (t_logp - s_logp)).sum(-1), (p_s * (s_logp - t_logp)).sum(-1),
                        -(p_t * t_logp).sum(-1), -(p_s * s_logp).sum(-1)])


def _block(h_s, w_s, b_s, h_t, w_t, b_t, ids, row_weight, temperature, mode, alpha, top_k, add_tail):
    dtype = compute_dtype(h_s.dtype, w_s.dtype)
    up = (lambda x: None if x is None else x.to(dtype))
    x = lm_logits(up(h_s), up(w_s), up(b_s)) / temperature
    with torch.no_grad():
        z = lm_logits(up(h_t), up(w_t), up(b_t)) / temperature
    per_token = token_losses(x, z, ids, mode, alpha, top_k, add_tail)
    with torch.no_grad():
        stats = row_stats(x.detach(), z)
    return (per_token * row_weight.to(dtype)).sum(), per_token.detach(), stats


def sdpo_loss(h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor, w_t: Tensor, b_t: Tensor | None,
              ids: Tensor, row_weight: Tensor, *, temperature: float = 1.0, mode: str = "sampled_token",
              alpha: float = 1.0, top_k: int = 20, add_tail: bool = False,
              chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """``Σ_r row_weight[r] · ℓ_r`` for student hidden states ``h_s [N, H]`` (lm head ``w_s, b_s``)
    and teacher hidden states ``h_t [N, H]`` (lm head ``w_t, b_t``, no grad) of the same positions.

    Logits are ``(h W^T + b) / temperature``, in float32 at least. Returns ``(loss, ℓ [N],
    stats [4, N])``, the last two detached (``stats``: :func:`row_stats`).
    """
    h_t, w_t = h_t.detach(), w_t.detach()
    b_t = b_t.detach() if b_t is not None else None
    loss = h_s.sum() * 0.0
    per_token, stats = [], []
    for a in range(0, h_s.shape[0], max(1, chunk_size)):
        sl = slice(a, a + chunk_size)
        args = (h_s[sl], w_s, b_s, h_t[sl], w_t, b_t, ids[sl], row_weight[sl], temperature, mode, alpha, top_k, add_tail)
        part, lt, kt = checkpoint(_block, *args, use_reentrant=False) if torch.is_grad_enabled() else _block(*args)
        loss = loss + part
        per_token.append(lt)
        stats.append(kt)
    if not per_token:
        return loss, torch.zeros(0, device=h_s.device), torch.zeros(4, 0, device=h_s.device)
    return loss, torch.cat(per_token), torch.cat(stats, 1)
