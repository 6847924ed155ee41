"""The teacher side of a distillation loss, and the steered target it defines (method.md §3).

A batch of ``N`` distilled rows (completion positions of the target rollouts, flattened) gets its
teacher distribution from hidden states passed through the teacher's lm head ``W_T [V, H]``
(bias ``b_T [V]`` optional). For row ``r``::

    z0_r   = anchor_scale_r · (h_anchor_r W_T^T + b_T)                 (0 when anchor is None)
    zpos_r = mean_{k: pos_mask[k, r]} log_softmax(h_pos[k, r] W_T^T + b_T)
    zneg_r = mean_{k: neg_mask[k, r]} log_softmax(h_neg[k, r] W_T^T + b_T)      (negative_branch = "mean_log")
           = log( (1/K_r) Σ_{k: neg_mask[k, r]} softmax(h_neg[k, r] W_T^T + b_T) )  (negative_branch = "log_mean",
             RLCSD's marginalisation: logsumexp of the log-probs minus log K_r)
             or log_softmax(z0_r) when no negative context is valid for the row
    d_r    = zpos_r − zneg_r     (context pooling, negative_pool=True)
           = zpos_r              (negative_pool=False)
           = direction[row_direction[r]]   (global pooling)
           = 0                   (no valid positive context, or no steering inputs)
    d_r    ← d_r / rms(d_r)      (normalize = "rms"; rms over the vocabulary)
    z̃_r   = z0_r + λ_r · d_r
    log p̃_r = log_softmax(z̃_r / T)

The positive pool is always the mean of log-probabilities. Both pools are accumulated one context
at a time by :func:`pool_start_` / :func:`pool_add_` / :func:`pool_finish_`, the one pooling kernel
the reference path here and the chunked path (``chunked.py``) share: a running weighted sum for
``mean_log``, a running ``logaddexp`` for ``log_mean`` (one ``[n, V]`` accumulator either way).

Everything here is computed under ``no_grad`` by the callers: gradients flow only through the
student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RMS_EPS = 1e-12
NEGATIVE_BRANCHES = ("mean_log", "log_mean")  # zneg: mean of log-probs / log of mean probability


@dataclass
class TeacherTarget:
    """Teacher inputs for ``N`` rows. Shapes: ``H`` hidden size, ``V`` vocabulary.

    Attributes:
        weight: ``[V, H]`` teacher lm-head weight.
        bias: ``[V]`` or None.
        anchor_hidden: ``[N, H]`` or None (z0 = 0).
        anchor_scale: ``[N]`` multiplier on z0 per row, or None (all ones).
        pos_hidden, neg_hidden: ``[K, N, H]`` context-pooling hidden states, or None.
        pos_mask, neg_mask: ``[K, N]`` bool: which contexts are valid for each row.
        negative_pool: subtract the negative pool.
        negative_branch: how the negative contexts are pooled (``NEGATIVE_BRANCHES``).
        direction: ``[D, V]`` global-pooling vectors; ``row_direction [N]`` long index into it.
        strength: λ, a float or ``[N]`` per row.
        normalize: ``"none"`` or ``"rms"``.
    """

    weight: Tensor
    bias: Tensor | None = None
    anchor_hidden: Tensor | None = None
    anchor_scale: Tensor | None = None
    pos_hidden: Tensor | None = None
    pos_mask: Tensor | None = None
    neg_hidden: Tensor | None = None
    neg_mask: Tensor | None = None
    negative_pool: bool = True
    negative_branch: str = "mean_log"
    direction: Tensor | None = None
    row_direction: Tensor | None = None
    strength: float | Tensor = 1.0
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.negative_branch not in NEGATIVE_BRANCHES:
            raise ValueError(f"steering.negative_branch: {self.negative_branch!r} not in {', '.join(NEGATIVE_BRANCHES)}")

    @property
    def num_rows(self) -> int:
        for t in (self.anchor_hidden,):
            if t is not None:
                return t.shape[0]
        for t in (self.pos_hidden, self.neg_hidden):
            if t is not None:
                return t.shape[1]
        if self.row_direction is not None:
            return self.row_direction.shape[0]
        raise ValueError("TeacherTarget has no rows: give anchor_hidden, pos_hidden or row_direction")

    def rows(self, sl: slice) -> "TeacherTarget":
        """The same target restricted to rows ``sl`` (used by the chunked loss)."""

        def cut(t, dim=0):
            if t is None or not isinstance(t, Tensor) or t.dim() == 0:
                return t
            return t[sl] if dim == 0 else t[:, sl]

        return TeacherTarget(
            weight=self.weight,
            bias=self.bias,
            anchor_hidden=cut(self.anchor_hidden),
            anchor_scale=cut(self.anchor_scale),
            pos_hidden=cut(self.pos_hidden, 1),
            pos_mask=cut(self.pos_mask, 1),
            neg_hidden=cut(self.neg_hidden, 1),
            neg_mask=cut(self.neg_mask, 1),
            negative_pool=self.negative_pool,
            negative_branch=self.negative_branch,
            direction=self.direction,
            row_direction=cut(self.row_direction),
            strength=cut(self.strength) if isinstance(self.strength, Tensor) else self.strength,
            normalize=self.normalize,
        )


def lm_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden [..., H] @ weight[V, H]^T + bias`` → ``[..., V]``."""
    out = hidden @ weight.T
    return out + bias if bias is not None else out


def pool_start_(acc: Tensor, mode: str) -> Tensor:
    """Reset the running pool ``acc [n, V]``: 0 for ``mean_log``, ``-inf`` (log of an empty sum) for ``log_mean``."""
    if mode not in NEGATIVE_BRANCHES:
        raise ValueError(f"steering.negative_branch: {mode!r} not in {', '.join(NEGATIVE_BRANCHES)}")
    return acc.zero_() if mode == "mean_log" else acc.fill_(float("-inf"))


def pool_add_(acc: Tensor, lp: Tensor, valid: Tensor, weight: Tensor, mode: str) -> None:
    """Add one context's log-probs ``lp [n, V]`` to the running pool ``acc`` on the rows ``valid [n]``.

    ``mean_log``: ``acc += weight · lp`` (``weight [n]`` = ±1 / count: the mean, signed, comes out
    directly); ``log_mean``: ``acc = logaddexp(acc, lp)`` (``weight`` unused). ``lp`` is
    overwritten on the invalid rows.
    """
    if not bool(valid.all()):
        lp.masked_fill_(~valid.unsqueeze(-1), 0.0 if mode == "mean_log" else float("-inf"))
    if mode == "mean_log":
        acc.addcmul_(lp, weight.unsqueeze(-1))
    else:
        torch.logaddexp(acc, lp, out=acc)


def pool_finish_(acc: Tensor, count: Tensor, mode: str) -> Tensor:
    """``log_mean``: ``acc -= log count`` (rows without a valid context stay ``-inf``); ``mean_log``: nothing left to do."""
    if mode == "log_mean":
        acc.sub_(count.clamp(min=1).log().unsqueeze(-1))
    return acc


def _pool(hidden: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, mode: str) -> tuple[Tensor, Tensor]:
    """Pool of log_softmax logits over the valid contexts. Returns ``(pool [N, V], count [N])``.

    Loops over contexts so that at most two ``[N, V]`` tensors are alive.
    """
    K, N, _ = hidden.shape
    acc = pool_start_(torch.empty(N, weight.shape[0], dtype=hidden.dtype, device=hidden.device), mode)
    count = mask.sum(0).to(hidden.dtype)
    inv = 1.0 / count.clamp(min=1)
    for k in range(K):
        pool_add_(acc, torch.log_softmax(lm_logits(hidden[k], weight, bias), -1), mask[k], inv, mode)
    return pool_finish_(acc, count, mode), count


def steered_logits(tgt: TeacherTarget) -> tuple[Tensor, Tensor]:
    """The steered teacher logits ``z̃ [N, V]`` and the per-row RMS of the applied ``d`` ``[N]``.

    Pure function of ``tgt``; call it under ``no_grad``.
    """
    N = tgt.num_rows
    V = tgt.weight.shape[0]
    dtype, dev = tgt.weight.dtype, tgt.weight.device
    if tgt.anchor_hidden is not None:
        z0 = lm_logits(tgt.anchor_hidden, tgt.weight, tgt.bias)
        if tgt.anchor_scale is not None:
            z0 = z0 * tgt.anchor_scale.to(dtype).unsqueeze(-1)
    else:
        z0 = torch.zeros(N, V, dtype=dtype, device=dev)

    d = None
    if tgt.pos_hidden is not None:
        zpos, npos = _pool(tgt.pos_hidden, tgt.pos_mask, tgt.weight, tgt.bias, "mean_log")
        d = zpos
        if tgt.negative_pool:
            if tgt.neg_hidden is not None and tgt.neg_hidden.shape[0] > 0:
                zneg, nneg = _pool(tgt.neg_hidden, tgt.neg_mask, tgt.weight, tgt.bias, tgt.negative_branch)
                zneg = torch.where((nneg > 0).unsqueeze(-1), zneg, torch.log_softmax(z0, -1))
            else:
                zneg = torch.log_softmax(z0, -1)
            d = zpos - zneg
        d = torch.where((npos > 0).unsqueeze(-1), d, torch.zeros_like(d))
    elif tgt.direction is not None:
        d = tgt.direction[tgt.row_direction]

    if d is None:
        return z0, torch.zeros(N, dtype=dtype, device=dev)
    rms = d.pow(2).mean(-1).sqrt()
    if tgt.normalize == "rms":
        d = d / (rms + RMS_EPS).unsqueeze(-1)
        rms = d.pow(2).mean(-1).sqrt()
    lam = tgt.strength
    if isinstance(lam, Tensor):
        lam = lam.to(dtype).unsqueeze(-1)
    return z0 + lam * d, rms


def mean_log_softmax(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int = 1024) -> Tensor:
    """``mean_rows log_softmax(hidden W^T + b)`` → ``[V]`` (global pooling), in row blocks.

    ``hidden`` is ``[M, H]`` with ``M >= 1`` (a pool without tokens has no mean: callers give such
    a group no direction, see ``OGLSSD._global_direction``). The sum over rows is accumulated in
    float32 (or wider) whatever the hidden dtype; the result has the hidden dtype.
    """
    if hidden.shape[0] == 0:
        raise ValueError("mean_log_softmax needs at least one row (a pool whose rollouts are all empty has no mean)")
    acc = torch.zeros(weight.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_size):
        acc += torch.log_softmax(lm_logits(hidden[s : s + chunk_size], weight, bias), -1).sum(0, dtype=acc.dtype)
    return (acc / hidden.shape[0]).to(hidden.dtype)
