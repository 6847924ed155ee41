"""``loss.clip=safe`` (method.md §1): the per-position rescaled forward KL.

``L_t = sg(α_t)·KL_t`` with ``α_t = min(1, τ / KL_t)``: value ``min(KL_t, τ)``, gradient on the
student logits ``α_t (p_S − p_T) / T``. Wherever the teacher wants more of a token
(``p_T(v) > p_S(v)``) the gradient on ``z_v`` is negative, so descent raises ``z_v`` — which the
entry clip violates for every clamped entry (its gradient there is ``p_S(u)·Σ_{v unclamped} p_T(v) > 0``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ogls_sd.losses import DivergenceSpec, TeacherTarget, chunked, divergence_rows, reference, steered_logits

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread


@st.composite
def logits_case(draw, force_reversal: bool):
    """Teacher/student logits ``[N, V]`` (float64), τ, temperature; optionally with one entry per
    row constructed so that the entry clip reverses it (p_T(u) ≫ p_S(u), summand > τ)."""
    N = draw(st.integers(1, 4))
    V = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 6.0))
    tau = draw(st.sampled_from([1e-3, 0.02, 0.05, 0.2, 1.0]))
    T = draw(st.sampled_from([1.0, 0.7, 1.5]))
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    zs = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    if force_reversal:
        u = torch.randint(0, V, (N,), generator=g)
        rows = torch.arange(N)
        zt[rows, u] = zt.max(-1).values + 6.0 * T  # the teacher puts most of its mass on u ...
        zs[rows, u] = zs.min(-1).values - 6.0 * T  # ... the student very little: p_T(u) log(p_T/p_S)(u) > 1 ≥ τ
    return zt, zs, tau, T


def _grad(zt, zs, spec):
    x = zs.clone().requires_grad_(True)
    t_logp = torch.log_softmax(zt / spec.temperature, -1)
    s_logp = torch.log_softmax(x / spec.temperature, -1)
    value, clipped = divergence_rows(t_logp, s_logp, spec)
    value.sum().backward()
    return value.detach(), clipped, x.grad, t_logp.exp(), s_logp.detach().exp()


def _raises_mask(p_t, p_s):
    """Entries where the teacher wants more of v (with a margin above float64 rounding)."""
    return p_t - p_s > 1e-9


@SETTINGS
@given(logits_case(force_reversal=False))
def test_safe_gradient_never_lowers_a_wanted_token(case):
    zt, zs, tau, T = case
    spec = DivergenceSpec(clip="safe", clip_tau=tau, temperature=T)
    value, clipped, grad, p_t, p_s = _grad(zt, zs, spec)
    assert torch.all(grad[_raises_mask(p_t, p_s)] < 0)
    assert torch.all(grad[p_s - p_t > 1e-9] > 0)  # and the other way round: the sign of the unclipped gradient
    # closed form: value min(KL, τ), gradient α (p_S − p_T) / T with α = min(1, τ / KL)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1)
    alpha = torch.where(kl > tau, tau / kl, torch.ones_like(kl))
    assert torch.allclose(value, torch.minimum(kl, torch.full_like(kl, tau)), rtol=1e-12, atol=1e-14)
    assert torch.allclose(grad, alpha[:, None] * (p_s - p_t) / T, rtol=1e-9, atol=1e-13)
    assert torch.all(value <= tau * (1 + 1e-12))
    assert torch.equal(clipped, (kl > tau).to(kl.dtype))
    # bounded pull: ‖∂L_t/∂z‖₁ ≤ sqrt(2τ) / T (Pinsker: ‖p_S − p_T‖₁ ≤ sqrt(2 KL))
    assert torch.all(grad.abs().sum(-1) <= math.sqrt(2 * tau) / T * (1 + 1e-9))


@SETTINGS
@given(logits_case(force_reversal=True))
def test_entry_clip_reverses_where_safe_does_not(case):
    zt, zs, tau, T = case
    _, _, g_entry, p_t, p_s = _grad(zt, zs, DivergenceSpec(clip="entry", clip_tau=tau, temperature=T))
    _, _, g_safe, _, _ = _grad(zt, zs, DivergenceSpec(clip="safe", clip_tau=tau, temperature=T))
    wanted = _raises_mask(p_t, p_s)
    assert torch.all(g_safe[wanted] < 0)
    # every clamped entry has p_T > p_S and a positive entry-clip gradient: descent lowers it
    summands = p_t * (p_t.log() - p_s.log())
    clamped = summands > tau
    assert clamped.any(dim=-1).all()  # the construction clamps at least one entry per row
    assert torch.all(g_entry[clamped] > 0)
    assert torch.all(wanted[clamped])


def test_constructed_reversal():
    """A hand-made row: token 0 is wanted by the teacher (0.6 vs 0.1); entry pushes it down, safe up."""
    p_t = torch.tensor([[0.6, 0.2, 0.1, 0.1]], dtype=torch.float64)
    p_s = torch.tensor([[0.1, 0.3, 0.3, 0.3]], dtype=torch.float64)
    zt, zs = p_t.log(), p_s.log()
    _, _, g_entry, _, _ = _grad(zt, zs, DivergenceSpec(clip="entry", clip_tau=0.05))
    value, clipped, g_safe, _, _ = _grad(zt, zs, DivergenceSpec(clip="safe", clip_tau=0.05))
    # entry: token 0's summand 0.6·log 6 > τ is clamped: gradient p_S(0)·Σ_unclamped p_T = 0.1·0.4 > 0
    assert g_entry[0, 0].item() == pytest.approx(0.1 * 0.4, rel=1e-12)
    assert g_safe[0, 0].item() < 0
    kl = (p_t * (p_t.log() - p_s.log())).sum().item()
    assert value.item() == pytest.approx(0.05, rel=1e-12) and clipped.item() == 1.0
    assert torch.allclose(g_safe, (0.05 / kl) * (p_s - p_t), rtol=1e-12)


def test_safe_validation():
    with pytest.raises(ValueError, match="clip_tau > 0"):
        DivergenceSpec(clip="safe", clip_tau=0.0)
    DivergenceSpec(divergence="jsd", clip="safe")  # a row clip: any divergence


# --------------------------------------------------------------------- reference vs chunked


def _case(kind: str, N: int, H: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    hidden, weight, bias = rnd(N, H), rnd(V, H, scale=0.5), rnd(V, scale=0.5)
    t_weight = weight + rnd(V, H, scale=0.3)
    kw = dict(weight=t_weight, bias=rnd(V, scale=0.5), anchor_hidden=hidden + rnd(N, H, scale=0.5))
    if kind == "ctx":
        K = 2
        kw.update(pos_hidden=rnd(K, N, H), pos_mask=torch.rand(K, N, generator=g) < 0.8,
                  neg_hidden=rnd(K, N, H), neg_mask=torch.rand(K, N, generator=g) < 0.6, strength=0.7)
    rw = rnd(N).abs() * (torch.rand(N, generator=g) < 0.85)
    ids = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, TeacherTarget(**kw), rw, ids


def _run(fn, case, spec, **kw):
    hidden, weight, bias, target, rw, ids = case
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = fn(h, w, b, target, spec, rw, ids, **kw)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


def _logps(case, spec):
    hidden, weight, bias, target, _, _ = case
    z, _ = steered_logits(target)
    T = spec.temperature
    return torch.log_softmax(z / T, -1), torch.log_softmax((hidden @ weight.T + bias) / T, -1)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


@pytest.mark.parametrize("kind", ("anchor", "ctx"))
@pytest.mark.parametrize(
    "spec",
    [
        DivergenceSpec(clip="safe", clip_tau=0.05),
        DivergenceSpec(clip="safe", clip_tau=0.3, temperature=1.4),
        DivergenceSpec(divergence="jsd", beta=0.5, clip="safe", clip_tau=0.05),
        DivergenceSpec(divergence="reverse_kl", clip="safe", clip_tau=0.1),
        DivergenceSpec(divergence="sampled_token", clip="safe", clip_tau=0.1),
        DivergenceSpec(divergence="topk", top_k=5, clip="safe", clip_tau=0.05),
    ],
    ids=["fkl", "fkl_T", "jsd05", "rkl", "sampled", "topk"],
)
def test_safe_reference_matches_chunked_float64(kind, spec):
    case = _case(kind, N=13, H=16, V=37, seed=3)
    with torch.no_grad():  # τ between two middle positive row values: some rows rescaled, not all, no ties
        free = divergence_rows(*_logps(case, spec), dataclasses.replace(spec, clip="none"), case[5])[0]
    pos = free[(case[4] > 0) & (free > 0)].sort().values
    k = pos.numel() // 2
    spec = dataclasses.replace(spec, clip_tau=float(pos[k - 1] + pos[k]) / 2)
    ref, ref_g = _run(reference.distill_loss, case, spec)
    ch, ch_g = _run(chunked.distill_loss, case, spec, chunk_size=4)
    assert _rel(ch.loss, ref.loss) <= 1e-10
    for k in ref.stats:
        assert _rel(ch.stats[k], ref.stats[k]) <= 1e-10, k
    for gr, gc in zip(ref_g, ch_g):
        assert _rel(gc, gr) <= 1e-10
    # the clip is exercised (some rows rescaled, not all) and logged per position like `token`
    assert 0 < ch.stats["clipped"][case[4] > 0].sum() < int((case[4] > 0).sum())
    assert torch.all(ch.stats["vocab"] == 1)
