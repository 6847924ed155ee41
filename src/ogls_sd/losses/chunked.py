"""Memory-efficient distillation loss: the reference values and gradients, one row block at a time.

``distill_loss`` here has the contract of :func:`ogls_sd.losses.reference.distill_loss` (same loss,
same per-row stats, same gradients w.r.t. ``student_hidden``, ``student_weight`` and
``student_bias``) but never materialises ``[N, V]`` logits. Rows are processed in blocks of at most
``chunk_size``; for each block, under ``no_grad``:

1. the steered teacher log-probs ``log p̃ [n, V]`` (each positive and negative context's
   log-softmax folded into the direction ``d`` one context at a time by the pooling kernel the
   reference shares, ``target.pool_add_``: a running mean, or a running logsumexp for
   ``negative_branch=log_mean``; the anchor logits
   ``z0``, the fallback, RMS normalisation, ``z0 + λ d``, temperature, log-softmax),
2. the student logits ``h W^T + b`` of the block,
3. the per-row divergence, the stats, and ``G = dL/dlogits [n, V]`` (written over the student
   logits) in closed form — forward KL with every clip, reverse KL, generalized JSD,
   sampled-token — a few rows at a time in small scratch buffers; or by a local autograd call on
   the block with the reference's own functions (top-k, and any block whose log-probs contain
   ``-inf``),
4. ``grad_hidden[block] = G W``, ``grad_weight += Gᵀ h``, ``grad_bias += Σ_rows G``.

The gradients are stored on the autograd context and scaled by ``grad_output`` in backward (the
approach of Liger-Kernel's fused linear losses). Memory: two ``[chunk_size, V]`` work buffers,
allocated once per call and reused by every block, plus three or four ``[r, V]`` scratch buffers
(``r·V ≈ SCRATCH_ELEMENTS``), plus ``grad_weight [V, H]`` when the weight needs a gradient. Top-k
uses the reference's functions on each block (a few more block-sized temporaries).

Closed forms used (``w`` row weight, ``T`` temperature, ``s = log p_S``, ``t = log p̃``, ``p_S = e^s``,
``p_T = e^t``; the gradient is w.r.t. the raw student logits ``x`` with ``s = log_softmax(x / T)``):

* forward KL, ``L = Σ_v f(ℓ_v)``, ``ℓ_v = p_T(v)(t_v − s_v)``: with ``q = p_T · m``,
  ``m_v = [ℓ_v ≤ τ]`` for the entry clip (a clamped summand has zero gradient) and ``m = 1``
  otherwise, ``dL/dx = (w/T) (p_S Σ_v q_v − q)``; the token clip multiplies the row by
  ``[L ≤ τ]``, the safe clip by ``α = min(1, τ/L)`` (both act on any divergence's row value).
* reverse KL, ``L = Σ p_S (s − t)``: ``dL/dx = (w/T) p_S (s − t − L + 1 − Σ p_S)``.
* JSD, ``0 < β < 1``: ``dL/dx = (w/T)(1 − β) p_S (s − log m − KL(p_S‖m))``; β = 0 and β = 1 are
  forward and reverse KL.
* sampled-token, ``L = −A s_y`` with ``A = sg(t_y − s_y)``: ``dL/dx = (w/T) A (p_S − onehot(y))``.

Precision: the softmax/divergence math runs in float32 at least, whatever the model dtype (as in
the reference, :func:`ogls_sd.losses.reference.compute_dtype`). With bf16/fp16 inputs each logits GEMM
(student, every teacher context, the anchor) writes float32-accumulated, unrounded logits into the
float32 work buffers (see :func:`_linear_into`); row weights, direction, anchor scale and strength
are upcast too. ``G`` is cast to the weight dtype for the two gradient GEMMs; low-precision weights
get a float32 ``grad_weight`` accumulator; gradients are returned in the input dtypes. The loss and
the stats are float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from . import reference as _reference
from .divergence import DivergenceSpec, divergence_rows, safe_scale
from .reference import DistillOutput, compute_dtype, row_stats
from .target import RMS_EPS, TeacherTarget, pool_add_, pool_finish_, pool_start_

SCRATCH_ELEMENTS = 1 << 21  # per small scratch buffer (8 MiB in float32): rows of the divergence step
STAT_KEYS = ("kl", "clipped", "vocab", "teacher_entropy", "student_entropy", "steer_rms")
IMPLS = ("reference", "chunked")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _rowdot(a: Tensor, b: Tensor, tmp: Tensor) -> Tensor:
    """Row-wise dot product of ``a, b [n, V]`` → ``[n]``, in rows of ``tmp [r, V]`` (scratch).

    ``sum`` (pairwise summation) rather than a BLAS dot: its error does not grow with V, so the
    per-row values match the reference's ``(p * x).sum(-1)`` to rounding at V = 152k in float32.
    """
    r = tmp.shape[0]
    if a.shape[0] <= r:
        return torch.mul(a, b, out=tmp[: a.shape[0]]).sum(-1)
    return torch.cat([torch.mul(a[i : i + r], b[i : i + r], out=tmp[: min(r, a.shape[0] - i)]).sum(-1) for i in range(0, a.shape[0], r)])


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=) usable (CUDA builds of recent torch); cleared on failure


def _linear_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out[n, V] = hidden[n, H] @ weight[V, H]^T + bias`` written into the work buffer ``out``.

    When ``out`` is wider than the inputs (bf16/fp16 model, float32 work buffer) the logits are
    computed with float32 accumulation and written unrounded: on CUDA by a low-precision GEMM with a
    float32 output (``torch.mm(..., out_dtype=)``); otherwise by upcasting the weight a slice of
    rows at a time (``SCRATCH_ELEMENTS`` per slice; no full float32 copy of the lm head).
    """
    if hidden.dtype == weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    done = False
    if out.device.type == "cuda" and hidden.dtype == weight.dtype and _MM_OUT_DTYPE[0]:
        try:
            out.copy_(torch.mm(hidden, weight.t(), out_dtype=out.dtype))
            done = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    if not done:
        h = hidden.to(out.dtype)
        step = max(1, SCRATCH_ELEMENTS // max(1, weight.shape[1]))
        for a in range(0, weight.shape[0], step):
            out[:, a : a + step] = h @ weight[a : a + step].to(out.dtype).t()
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def _log_softmax_(x: Tensor) -> Tensor:
    """``x ← log_softmax(x, -1)`` in place.

    On CPU the kernel reads each row (max, sum of exp) before it writes it, so the output may alias
    the input; elsewhere a temporary is used.
    """
    if x.device.type == "cpu":
        return torch.log_softmax(x, -1, out=x)
    return x.copy_(torch.log_softmax(x, -1))


def _col(v: Tensor) -> Tensor:
    return v.unsqueeze(-1)


def auto_chunk_size(
    vocab_size: int,
    num_rows: int | None = None,
    budget_bytes: int = 512 * 2**20,
    element_size: int = 4,
    max_rows: int = 1024,
) -> int:
    """Rows per block for the chunked loss.

    At most ``max_rows``; at most ``budget_bytes`` per ``[rows, V]`` work buffer (there are two);
    and, given ``num_rows`` (N), at most N / 8 rows, so that the blocks never hold more than a
    quarter of what one ``[N, V]`` logits tensor would (the reference holds about nine). Rounded
    down to a multiple of 32 (GEMM-friendly), at least 32 (or N when smaller). Examples (float32):
    V = 152k: N = 1024 → 128, N = 4096 → 512, N unknown → 864; V = 32k: N = 4096 → 512.
    """
    rows = min(max_rows, budget_bytes // max(1, vocab_size * element_size))
    if num_rows is not None:
        rows = min(rows, max(32, num_rows // 8), max(1, num_rows))
    return int(rows // 32 * 32) if rows >= 32 else int(max(1, rows))


def _accumulate_grads(Gw, G, h, weight, grad_h, grad_w, grad_b, sl: slice) -> None:
    """``grad_h[sl] = Gw W``, ``grad_w += Gwᵀ h``, ``grad_b += Σ_rows G`` (each when not None).

    ``G [n, V]`` is dL/dlogits of the block, ``Gw`` the same in the weight's dtype.
    """
    if grad_h is not None:
        if grad_h.dtype == Gw.dtype:
            torch.mm(Gw, weight, out=grad_h[sl])
        else:
            grad_h[sl] = (Gw @ weight).to(grad_h.dtype)
    if grad_w is not None:
        if grad_w.dtype == Gw.dtype == h.dtype:
            grad_w.addmm_(Gw.t(), h)
        else:
            grad_w.add_((Gw.t() @ h.to(Gw.dtype)).to(grad_w.dtype))
    if grad_b is not None:
        grad_b.add_(G.sum(0).to(grad_b.dtype))


# ----------------------------------------------------------------------------------------------
# teacher side: steered log-probs of one block, in work buffers
# ----------------------------------------------------------------------------------------------


def _pool_into(acc: Tensor, lp: Tensor, hidden: Tensor, mask: Tensor, tgt: TeacherTarget, mode: str, sign: float = 1.0) -> Tensor:
    """Run the contexts ``hidden [K, n, H]`` (valid where ``mask [K, n]``) through the shared pooling
    kernel (:func:`~ogls_sd.losses.target.pool_add_`) into ``acc``; returns the count ``[n]``.

    ``mean_log`` adds ``sign · mean_k log_softmax(h_k W^T + b)`` to ``acc``; ``log_mean`` folds the
    contexts into ``acc`` by a running ``logaddexp`` (the caller starts and finishes it). One
    context at a time: only the work buffer ``lp`` is needed besides ``acc``.
    """
    count = mask.sum(0).to(acc.dtype)
    wts = sign / count.clamp(min=1)
    for k in range(hidden.shape[0]):
        mk = mask[k]
        if not bool(mk.any()):
            continue  # no row of this block uses context k: skip its GEMM
        pool_add_(acc, _log_softmax_(_linear_into(lp, hidden[k], tgt.weight, tgt.bias)), mk, wts, mode)
    return count


def _direction_into(d: Tensor, lp: Tensor, tgt: TeacherTarget) -> tuple[Tensor, Tensor | None]:
    """Context pooling: ``d = zpos − zneg`` into ``d`` (rows without a valid negative context get
    ``zpos`` only; the caller subtracts their fallback). Returns the counts ``(npos, nneg)``.

    ``log_mean`` needs ``d`` to itself while it folds the negatives, so the negatives go first
    there: ``d = −zneg``, then the positives are added.
    """
    n = d.shape[0]
    has_neg = tgt.negative_pool and tgt.neg_hidden is not None and tgt.neg_hidden.shape[0] > 0
    nneg = torch.zeros(n, dtype=d.dtype, device=d.device) if tgt.negative_pool else None
    if has_neg and tgt.negative_branch == "log_mean":
        pool_start_(d, "log_mean")
        nneg = _pool_into(d, lp, tgt.neg_hidden, tgt.neg_mask, tgt, "log_mean")
        pool_finish_(d, nneg, "log_mean").neg_()
        d.index_fill_(0, (nneg == 0).nonzero().squeeze(1), 0.0)  # −log(empty) = +inf: the fallback's rows
        npos = _pool_into(d, lp, tgt.pos_hidden, tgt.pos_mask, tgt, "mean_log")
        return npos, nneg
    pool_start_(d, "mean_log")
    npos = _pool_into(d, lp, tgt.pos_hidden, tgt.pos_mask, tgt, "mean_log")
    if has_neg:
        nneg = _pool_into(d, lp, tgt.neg_hidden, tgt.neg_mask, tgt, "mean_log", -1.0)
    return npos, nneg


def _teacher_block(tgt: TeacherTarget, temperature: float, d: Tensor, lp: Tensor, tmp: Tensor) -> tuple[Tensor, Tensor]:
    """Steered teacher log-probs ``log softmax(z̃ / T)`` for the rows of ``tgt`` (already cut to the block).

    Two ``[n, V]`` work buffers: ``d`` accumulates the direction (and is free afterwards), ``lp``
    holds each context's log-softmax in turn, then ``z0``, then ``z̃``, and finally the returned
    log-probs. Returns ``(t_logp [n, V] (= lp), steer_rms [n])``. Same formulas as
    :func:`ogls_sd.losses.target.steered_logits` (see there).
    """
    n, V = lp.shape
    dtype = lp.dtype
    sub_rows = tmp.shape[0]
    have_d = False
    npos = nneg = None
    if tgt.pos_hidden is not None:
        have_d = True
        npos, nneg = _direction_into(d, lp, tgt)
    elif tgt.direction is not None:
        have_d = True
        direction = tgt.direction if tgt.direction.dtype == dtype else tgt.direction.to(dtype)
        torch.index_select(direction, 0, tgt.row_direction, out=d)

    z0 = lp
    if tgt.anchor_hidden is not None:
        _linear_into(z0, tgt.anchor_hidden, tgt.weight, tgt.bias)
        if tgt.anchor_scale is not None:
            z0.mul_(_col(tgt.anchor_scale.to(dtype)))
    else:
        z0.zero_()

    if nneg is not None:
        fallback = (nneg == 0).nonzero().squeeze(1)
        for i in range(0, fallback.numel(), sub_rows):  # no valid negative context: zneg := log_softmax(z0)
            rows = fallback[i : i + sub_rows]
            d.index_add_(0, rows, torch.log_softmax(z0.index_select(0, rows), -1), alpha=-1.0)
    if npos is not None:
        invalid = (npos == 0).nonzero().squeeze(1)
        if invalid.numel() > 0:  # no valid positive context: d = 0
            d.index_fill_(0, invalid, 0.0)

    if have_d:
        rms = (_rowdot(d, d, tmp) / V).sqrt()
        if tgt.normalize == "rms":
            d.div_(_col(rms + RMS_EPS))
            rms = (_rowdot(d, d, tmp) / V).sqrt()
        lam = tgt.strength
        if isinstance(lam, Tensor):
            z0.addcmul_(d, _col(lam.to(dtype)))
        else:
            z0.add_(d, alpha=float(lam))
    else:
        rms = torch.zeros(n, dtype=dtype, device=lp.device)
    if temperature != 1.0:
        z0.div_(temperature)
    return _log_softmax_(z0), rms


# ----------------------------------------------------------------------------------------------
# one block: value, stats and dL/dlogits
# ----------------------------------------------------------------------------------------------


def _generic_block(h, W, b, tgt, spec, w, ids):
    """Any divergence, by the reference's own functions and a local autograd call on the block.

    Returns ``(value [n], stats dict, G [n, V])`` with ``G = d(Σ w·value)/d logits``.
    """
    T = spec.temperature
    dtype = compute_dtype(h.dtype, tgt.weight.dtype)
    with torch.no_grad():
        n, V = h.shape[0], tgt.weight.shape[0]
        d, lp = (torch.empty(n, V, dtype=dtype, device=h.device) for _ in range(2))
        tmp = torch.empty(max(1, min(n, SCRATCH_ELEMENTS // max(1, V))), V, dtype=dtype, device=h.device)
        t_logp, rms = _teacher_block(tgt, T, d, lp, tmp)
        del d, tmp
    with torch.enable_grad():
        x = _linear_into(torch.empty(h.shape[0], W.shape[0], dtype=dtype, device=h.device), h.detach(), W.detach(), b if b is None else b.detach())
        x.requires_grad_(True)
        s_logp = torch.log_softmax(x / T, -1)
        value, clipped = divergence_rows(t_logp, s_logp, spec, ids)
        (g,) = torch.autograd.grad((value * w).sum(), x)
    stats = row_stats(t_logp, s_logp.detach(), clipped, rms, spec)
    return value.detach(), stats, g


def _divergence_rows_(tl: Tensor, x: Tensor, spec: DivergenceSpec, w: Tensor, ids: Tensor | None, scratch: list[Tensor]):
    """Closed-form value, stats and gradient for a few rows, in place.

    ``tl [r, V]``: teacher log-probs (overwritten). ``x [r, V]``: student logits already divided by
    T; overwritten with ``G = d(Σ w·value)/d(raw logits)``. ``scratch``: two (three for JSD)
    ``[r, V]`` buffers, plus one for row-wise products. Returns ``(value, stats)`` or None when a log-prob is ``-inf``.
    """
    T = spec.temperature
    V = x.shape[1]
    A, B, tmp = scratch[0], scratch[1], scratch[-1]
    sl = _log_softmax_(x)
    P = torch.exp(tl, out=A)
    t_ent = -_rowdot(P, tl, tmp)
    if bool(torch.isnan(t_ent).any()):
        return None
    div, clip, tau = spec.divergence, spec.clip, spec.clip_tau
    if div == "jsd" and spec.beta == 0.0:
        div = "forward_kl"
    elif div == "jsd" and spec.beta == 1.0:
        div = "reverse_kl"

    if div == "sampled_token":
        t_y = tl.gather(1, _col(ids)).squeeze(1)
        s_y = sl.gather(1, _col(ids)).squeeze(1)

    D = torch.sub(tl, sl, out=B) if div == "jsd" else tl.sub_(sl)  # t − s
    kl = _rowdot(P, D, tmp)
    coef = w / T
    clipped = torch.zeros_like(kl)

    if div == "forward_kl":
        if clip == "entry":
            D.mul_(P)  # the summands ℓ
            M = torch.le(D, tau, out=B)  # 1.0 where not clamped: those keep their gradient
            clipped = V - M.sum(-1)
            value = D.clamp_(max=tau).sum(-1)
            q = P.mul_(M)
        else:
            value = kl
            q = P
        PS = torch.exp(sl, out=B)
        s_ent = -_rowdot(PS, sl, tmp)
        G = torch.mul(PS, _col(q.sum(-1)), out=x).sub_(q)  # p_S Σq − q
    elif div == "reverse_kl":
        PS = torch.exp(sl, out=B)
        s_ent = -_rowdot(PS, sl, tmp)
        value = -_rowdot(PS, D, tmp)
        c = 1.0 - value - PS.sum(-1)
        G = torch.mul(PS, D.neg_().add_(_col(c)), out=x)  # p_S (s − t − L + 1 − Σ p_S)
    elif div == "sampled_token":
        PS = torch.exp(sl, out=B)
        s_ent = -_rowdot(PS, sl, tmp)
        adv = t_y - s_y
        value = -adv * s_y
        G = x.copy_(PS)
    elif div == "jsd":
        beta = spec.beta
        C = scratch[2]
        torch.add(sl, math.log1p(-beta), out=C)
        torch.add(tl, math.log(beta), out=D)
        log_m = torch.logaddexp(D, C, out=D)
        kl_t = _rowdot(P, torch.sub(tl, log_m, out=C), tmp)
        PS = torch.exp(sl, out=P)
        s_ent = -_rowdot(PS, sl, tmp)
        R = torch.sub(sl, log_m, out=C)  # s − log m
        kl_s = _rowdot(PS, R, tmp)
        value = beta * kl_t + (1.0 - beta) * kl_s
        G = torch.mul(R.sub_(_col(kl_s)), PS, out=x)
        coef = coef * (1.0 - beta)
    else:  # pragma: no cover - topk goes to the generic path
        raise ValueError(div)

    if bool(torch.isnan(s_ent).any()):
        return None
    if clip == "token":
        over = value > tau
        clipped = over.to(value.dtype)
        coef = coef * (~over).to(coef.dtype)
        value = torch.clamp(value, max=tau)
    elif clip == "safe":  # L = sg(α)·D, α = min(1, τ/D): gradient scaled by α > 0, never zeroed
        clipped = (value > tau).to(value.dtype)
        alpha = safe_scale(value, tau)
        coef = coef * alpha
        value = value * alpha
    if div == "sampled_token":
        a = adv * coef
        G.mul_(_col(a))
        G.scatter_add_(1, _col(ids), _col(-a))
    else:
        G.mul_(_col(coef))
    return value, {"kl": kl, "clipped": clipped, "teacher_entropy": t_ent, "student_entropy": s_ent}


def _fast_block(h, W, b, tgt, spec, w, ids, bufs, scratch):
    """Closed-form value, stats and ``G [n, V]`` for forward/reverse KL, JSD and sampled-token.

    ``bufs``: two ``[n, V]`` work buffers; ``scratch``: small ``[r, V]`` buffers; the divergence is
    computed ``r`` rows at a time. Returns None when a log-prob is ``-inf`` (the caller then uses
    :func:`_generic_block`, which reproduces the reference's ``0·log 0 = 0`` handling exactly).
    """
    n, V = bufs[0].shape
    R = scratch[0].shape[0]
    tl, rms = _teacher_block(tgt, spec.temperature, bufs[0], bufs[1], scratch[-1])  # in bufs[1]
    x = _linear_into(bufs[0], h, W, b)
    if spec.temperature != 1.0:
        x.div_(spec.temperature)
    value = torch.empty(n, dtype=x.dtype, device=x.device)
    stats = {k: torch.empty_like(value) for k in ("kl", "clipped", "teacher_entropy", "student_entropy")}
    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        out = _divergence_rows_(
            tl[r0:r1], x[r0:r1], spec, w[r0:r1], ids[r0:r1] if ids is not None else None, [t[: r1 - r0] for t in scratch]
        )
        if out is None:
            return None
        value[r0:r1] = out[0]
        for k, v in out[1].items():
            stats[k][r0:r1] = v
    stats["vocab"] = torch.full_like(value, float(V if spec.clip == "entry" else 1))
    stats["steer_rms"] = rms
    return value, stats, x


# ----------------------------------------------------------------------------------------------
# the autograd function
# ----------------------------------------------------------------------------------------------


class _ChunkedDistill(torch.autograd.Function):
    """Forward computes loss, stats and all student gradients block by block; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_weight, target_ids, target, spec, chunk_size):  # noqa: D401
        N, H = hidden.shape
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dtype = compute_dtype(hidden.dtype, target.weight.dtype)  # float32 at least
        dev = hidden.device
        rw = row_weight.to(device=dev, dtype=dtype)

        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=dev) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=dev) if need_b else None
        stats = {k: torch.empty(N, dtype=dtype, device=dev) for k in STAT_KEYS}
        loss = torch.zeros((), dtype=dtype, device=dev)

        rows = max(1, min(int(chunk_size), N))
        fast = spec.divergence != "topk" and N > 0
        work, scratch = [], []
        if fast:
            work = [torch.empty(rows, V, dtype=dtype, device=dev) for _ in range(2)]
            sub = max(1, min(rows, SCRATCH_ELEMENTS // max(1, V)))
            n_scratch = 4 if (spec.divergence == "jsd" and 0.0 < spec.beta < 1.0) else 3
            scratch = [torch.empty(sub, V, dtype=dtype, device=dev) for _ in range(n_scratch)]

        for s in range(0, N, rows):
            e = min(N, s + rows)
            n = e - s
            sl = slice(s, e)
            tgt = target.rows(sl)
            h = hidden[sl]
            w = rw[sl]
            ids = target_ids[sl] if target_ids is not None else None
            out = None
            if fast:
                out = _fast_block(h, weight, bias, tgt, spec, w, ids, [buf[:n] for buf in work], scratch)
            if out is None:
                out = _generic_block(h, weight, bias, tgt, spec, w, ids)
            value, st, G = out
            loss += (value * w).sum()
            for k in STAT_KEYS:
                stats[k][sl] = st[k]
            if need_h or need_w or need_b:
                Gw = G if G.dtype == weight.dtype else G.to(weight.dtype)
                _accumulate_grads(Gw, G, h, weight, grad_h, grad_w, grad_b, sl)
            del out, G, value, st
        del work, scratch

        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        ctx.grads = [grad_h, grad_w, grad_b]
        stat_list = [stats[k] for k in STAT_KEYS]
        ctx.mark_non_differentiable(*stat_list)
        return (loss, *stat_list)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the chunked distillation loss stores its gradients once: backward can run only once")
        ctx.grads = None  # let autograd take the tensors without copying them
        if not bool(grad_loss == 1):
            grads = [g * grad_loss.to(g.dtype) if g is not None else None for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    target: TeacherTarget,
    spec: DivergenceSpec,
    row_weight: Tensor,
    target_ids: Tensor | None = None,
    chunk_size: int = 1024,
) -> DistillOutput:
    """Chunked distillation loss with the reference's values, stats and gradients.

    Args:
        student_hidden: ``[N, H]`` final hidden states of the student at the distilled positions.
        student_weight: ``[V, H]`` student lm-head weight; ``student_bias``: ``[V]`` or None.
        target: the teacher inputs for the ``N`` rows (``TeacherTarget``; never receives a gradient).
        spec: divergence, clip, temperature.
        row_weight: ``[N]`` per-row weights (masking, gating and reduction).
        target_ids: ``[N]`` sampled tokens (needed for ``sampled_token``).
        chunk_size: rows per block; peak extra memory is about ``3 · chunk_size · V`` elements
            (+ a bool block for the entry clip) plus ``grad_weight [V, H]`` (see :func:`auto_chunk_size`).
    Returns:
        ``DistillOutput(loss, stats)``: ``loss`` a scalar with grad, ``stats`` detached ``[N]``
        tensors (see :class:`ogls_sd.losses.reference.DistillOutput`).
    """
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be [N, H], got {tuple(student_hidden.shape)}")
    if row_weight.shape != student_hidden.shape[:1]:
        raise ValueError(f"row_weight must be [N]={student_hidden.shape[0]}, got {tuple(row_weight.shape)}")
    if spec.divergence == "sampled_token" and target_ids is None:
        raise ValueError("divergence=sampled_token needs target_ids")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    loss, *stat_list = _ChunkedDistill.apply(
        student_hidden, student_weight, student_bias, row_weight, target_ids, target, spec, chunk_size
    )
    return DistillOutput(loss, dict(zip(STAT_KEYS, stat_list)))


# ----------------------------------------------------------------------------------------------
# token log-probs (tail SFT / NLL terms)
# ----------------------------------------------------------------------------------------------


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """``log softmax((h W^T + b)/T)[ids]`` per row; backward recomputes the logits block by block."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, chunk_size):
        N = hidden.shape[0]
        V = weight.shape[0]
        out = torch.empty(N, dtype=hidden.dtype, device=hidden.device)
        rows = max(1, min(int(chunk_size), N))
        if N > 0:
            raw = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
            for s in range(0, N, rows):
                e = min(N, s + rows)
                x = _linear_into(raw[: e - s], hidden[s:e], weight, bias)
                if temperature != 1.0:
                    x.div_(temperature)
                out[s:e] = _log_softmax_(x).gather(1, _col(ids[s:e])).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.temperature = temperature
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, ids = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        N, V = hidden.shape[0], weight.shape[0]
        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=weight.device) if need_b else None
        if N > 0 and (need_h or need_w or need_b):
            raw = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
            for s in range(0, N, rows):
                e = min(N, s + rows)
                g = _linear_into(raw[: e - s], hidden[s:e], weight, bias)
                if T != 1.0:
                    g.div_(T)
                _log_softmax_(g).exp_()  # p = exp(log_softmax), as log_softmax's backward computes it
                go = grad_out[s:e].to(g.dtype) / T
                g.mul_(_col(-go))
                g.scatter_add_(1, _col(ids[s:e]), _col(go))  # d/dx = (onehot − p)·go/T
                gw = g if g.dtype == weight.dtype else g.to(weight.dtype)
                _accumulate_grads(gw, g, hidden[s:e], weight, grad_h, grad_w, grad_b, slice(s, e))
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ids: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Chunked ``log softmax((hidden W^T + b)/T)`` gathered at ``ids``.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None; ids: ``[N]`` long.
    Returns:
        ``[N]`` log-probs with gradient w.r.t. ``hidden``, ``weight`` and ``bias`` (the backward pass
        recomputes each ``[chunk_size, V]`` block of logits instead of storing them).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, ids, float(temperature), chunk_size)


# ----------------------------------------------------------------------------------------------
# dispatch on ``loss.impl``
# ----------------------------------------------------------------------------------------------


def get_distill_loss(impl: str, chunk_size: int | None = None) -> Callable[..., DistillOutput]:
    """The distillation loss for ``loss.impl`` (``"reference"`` or ``"chunked"``).

    Both returned callables take ``(student_hidden, student_weight, student_bias, target, spec,
    row_weight, target_ids=None)``. ``chunk_size`` (rows per block) applies to ``chunked``; None or
    0 picks :func:`auto_chunk_size` from the vocabulary size and the number of rows at call time.
    """
    if impl == "reference":
        return _reference.distill_loss
    if impl == "chunked":
        if chunk_size:
            return functools.partial(distill_loss, chunk_size=chunk_size)

        def _auto(student_hidden, student_weight, student_bias, target, spec, row_weight, target_ids=None):
            # the work buffers are float32 at least (see the module docstring)
            cs = auto_chunk_size(student_weight.shape[0], student_hidden.shape[0], element_size=max(4, student_hidden.element_size()))
            return distill_loss(student_hidden, student_weight, student_bias, target, spec, row_weight, target_ids, cs)

        return _auto
    raise ValueError(f"loss.impl: {impl!r} not in {IMPLS}")


def get_token_logprobs(impl: str, chunk_size: int | None = None) -> Callable[..., Tensor]:
    """``token_logprobs`` for ``loss.impl``; signature ``(hidden, weight, bias, ids, temperature=1.0)``."""
    if impl == "reference":
        return _reference.token_logprobs
    if impl == "chunked":

        def _tl(hidden, weight, bias, ids, temperature=1.0):
            cs = chunk_size or auto_chunk_size(weight.shape[0], hidden.shape[0], element_size=hidden.element_size())
            return token_logprobs(hidden, weight, bias, ids, temperature, cs)

        return _tl
    raise ValueError(f"loss.impl: {impl!r} not in {IMPLS}")
