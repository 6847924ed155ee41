"""The pure math of losses/divergence.py and losses/target.py against naive float64 references.

Every reference here is written independently, with Python loops over rows and vocabulary entries
on numpy arrays (no call into the code under test), straight from the formulas of method.md §1/§3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ogls_sd.losses import DivergenceSpec, TeacherTarget, divergence_rows, mean_log_softmax, steered_logits
from ogls_sd.losses.divergence import forward_kl, generalized_jsd, reverse_kl, topk_buckets

TOL = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread


# ---------------------------------------------------------------------------- naive helpers


def np_log_softmax_row(x):
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return np.array([v - lse for v in x])


def np_log_softmax(X):
    return np.stack([np_log_softmax_row(list(r)) for r in X])


def naive_kl(lp, lq):
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), with 0·log 0 = 0."""
    total = 0.0
    for a, b in zip(lp, lq):
        p = math.exp(a)
        if p > 0:
            total += p * (a - b)
    return total


def naive_summands(lt, ls):
    return [math.exp(a) * (a - b) for a, b in zip(lt, ls)]


def naive_jsd_trl(lt, ls, beta):
    """TRL's generalized JSD (GKDTrainer.generalized_jsd_loss), written out per row.

    TRL computes with F.kl_div(input, target, log_target=True) = Σ exp(target)(target − input), i.e.
    KL(target ‖ input): beta == 0 → kl_div(student, teacher) = KL(T‖S); beta == 1 →
    kl_div(teacher, student) = KL(S‖T); otherwise log m = logsumexp(log S + log(1−β), log T + log β),
    jsd = β·kl_div(m, teacher) + (1−β)·kl_div(m, student) = β KL(T‖m) + (1−β) KL(S‖m).
    """

    def kl_div(inp, target):
        return sum(math.exp(t) * (t - i) for i, t in zip(inp, target))

    if beta == 0:
        return kl_div(ls, lt)
    if beta == 1:
        return kl_div(lt, ls)
    lm = [math.log((1 - beta) * math.exp(s) + beta * math.exp(t)) for s, t in zip(ls, lt)]
    return beta * kl_div(lm, lt) + (1 - beta) * kl_div(lm, ls)


def rand_logp(N, V, seed, scale=2.0):
    g = np.random.default_rng(seed)
    X = g.normal(size=(N, V)) * scale
    return np_log_softmax(X)


def t64(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


N, V = 6, 11


@pytest.fixture
def pair():
    lt = rand_logp(N, V, 1)
    ls = rand_logp(N, V, 2)
    return lt, ls


# ---------------------------------------------------------------------------- divergences


def test_forward_kl(pair):
    lt, ls = pair
    val, clipped = forward_kl(t64(lt), t64(ls), "none")
    expect = [naive_kl(lt[r], ls[r]) for r in range(N)]
    assert np.allclose(val.numpy(), expect, rtol=TOL, atol=TOL)
    assert torch.all(clipped == 0)
    assert all(e > 0 for e in expect)


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.05, 0.3])
def test_entry_clip(pair, tau):
    lt, ls = pair
    val, clipped = forward_kl(t64(lt), t64(ls), "entry", tau)
    for r in range(N):
        summ = naive_summands(lt[r], ls[r])
        assert abs(val[r].item() - sum(min(x, tau) for x in summ)) <= TOL
        assert clipped[r].item() == sum(1 for x in summ if x > tau)


def test_entry_clip_can_be_negative():
    lt = rand_logp(1, V, 3)
    ls = lt.copy()
    ls[0, 0] += 2.0  # the student over-weights token 0: its summand is strongly negative
    ls = np_log_softmax(ls)
    val, _ = forward_kl(t64(lt), t64(ls), "entry", 0.0)
    assert val.item() < 0


@pytest.mark.parametrize("tau", [0.1, 0.5, 5.0])
def test_token_clip(pair, tau):
    lt, ls = pair
    val, clipped = forward_kl(t64(lt), t64(ls), "token", tau)
    for r in range(N):
        kl = naive_kl(lt[r], ls[r])
        assert abs(val[r].item() - min(kl, tau)) <= TOL
        assert clipped[r].item() == (1.0 if kl > tau else 0.0)


def test_reverse_kl(pair):
    lt, ls = pair
    assert np.allclose(reverse_kl(t64(lt), t64(ls)).numpy(), [naive_kl(ls[r], lt[r]) for r in range(N)], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_trl_convention(pair, beta):
    lt, ls = pair
    got = generalized_jsd(t64(lt), t64(ls), beta).numpy()
    assert np.allclose(got, [naive_jsd_trl(lt[r], ls[r], beta) for r in range(N)], rtol=TOL, atol=TOL)


def test_jsd_endpoints_and_midpoint(pair):
    """β = 0 is forward KL(p_T‖p_S), β = 1 is reverse KL(p_S‖p_T), β = 0.5 the textbook JSD."""
    lt, ls = pair
    T, S = t64(lt), t64(ls)
    for r in range(N):
        assert abs(generalized_jsd(T, S, 0.0)[r].item() - naive_kl(lt[r], ls[r])) <= TOL
        assert abs(generalized_jsd(T, S, 1.0)[r].item() - naive_kl(ls[r], lt[r])) <= TOL
        pt, ps = np.exp(lt[r]), np.exp(ls[r])
        m = 0.5 * pt + 0.5 * ps
        js = 0.5 * sum(pt[v] * math.log(pt[v] / m[v]) for v in range(V)) + 0.5 * sum(
            ps[v] * math.log(ps[v] / m[v]) for v in range(V)
        )
        assert abs(generalized_jsd(T, S, 0.5)[r].item() - js) <= TOL
        assert 0 <= js <= math.log(2)
    # the interior formula degenerates to 0 at the ends: the special cases are needed
    assert generalized_jsd(T, S, 1e-12).abs().max().item() < 1e-9


def test_jsd_trl_batchmean_reduction(pair):
    """TRL's reduction="batchmean" on [N, V] logits is the mean over rows: row_weight = 1/N."""
    lt, ls = pair
    spec = DivergenceSpec(divergence="jsd", beta=0.0)
    val, _ = divergence_rows(t64(lt), t64(ls), spec)
    trl_batchmean = sum(naive_jsd_trl(lt[r], ls[r], 0.0) for r in range(N)) / N
    assert abs((val * (1.0 / N)).sum().item() - trl_batchmean) <= TOL


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("clip", ["none", "entry"])
def test_topk_tail_bucket(pair, k, clip):
    lt, ls = pair
    spec = DivergenceSpec(divergence="topk", top_k=k, clip=clip, clip_tau=0.05)
    val, clipped = divergence_rows(t64(lt), t64(ls), spec)
    for r in range(N):
        order = sorted(range(V), key=lambda v: -lt[r][v])[:k]
        pt, ps = np.exp(lt[r]), np.exp(ls[r])
        bt = [pt[v] for v in order] + [1.0 - sum(pt[v] for v in order)]
        bs = [ps[v] for v in order] + [1.0 - sum(ps[v] for v in order)]
        summ = [a * math.log(a / b) for a, b in zip(bt, bs)]
        if clip == "entry":
            assert abs(val[r].item() - sum(min(x, 0.05) for x in summ)) <= 1e-10
            assert clipped[r].item() == sum(1 for x in summ if x > 0.05)
        else:
            assert abs(val[r].item() - sum(summ)) <= 1e-10


def test_topk_k_at_least_vocab_is_forward_kl(pair):
    lt, ls = pair
    val, _ = divergence_rows(t64(lt), t64(ls), DivergenceSpec(divergence="topk", top_k=V + 5))
    assert np.allclose(val.numpy(), [naive_kl(lt[r], ls[r]) for r in range(N)], rtol=TOL, atol=TOL)


def test_topk_tiny_tail_in_float32():
    """A peaked teacher whose tail mass is below float32 resolution gives a finite, correct loss."""
    x = torch.full((1, 50), -30.0)
    x[0, 0] = 0.0
    lt = torch.log_softmax(x, -1)
    ls = torch.log_softmax(torch.randn(1, 50), -1)
    tb, sb = topk_buckets(lt, ls, 5)
    assert torch.isfinite(tb).all() and torch.isfinite(sb).all()
    assert abs(tb[0, -1].item() - (-30.0 + math.log(45))) < 1e-4
    val, _ = divergence_rows(lt, ls, DivergenceSpec(divergence="topk", top_k=5))
    full = (lt.exp() * (lt - ls)).sum()
    assert torch.isfinite(val).all() and abs(val.item() - full.item()) < 1e-3


def test_sampled_token_value_and_gradient():
    g = np.random.default_rng(4)
    X = g.normal(size=(N, V)) * 2
    lt = rand_logp(N, V, 5)
    ids = g.integers(0, V, size=N)
    x = t64(X).requires_grad_(True)
    s_logp = torch.log_softmax(x, -1)
    spec = DivergenceSpec(divergence="sampled_token")
    val, _ = divergence_rows(t64(lt), s_logp, spec, torch.tensor(ids))
    val.sum().backward()
    ls = np_log_softmax(X)
    for r in range(N):
        y = ids[r]
        adv = lt[r][y] - ls[r][y]
        assert abs(val[r].item() - (-adv * ls[r][y])) <= TOL
        # d/dx_v of −A·log p_S(y) with A held fixed: −A (1[v = y] − p_S(v))
        ps = np.exp(ls[r])
        expect = [-adv * ((1.0 if v == y else 0.0) - ps[v]) for v in range(V)]
        assert np.allclose(x.grad[r].numpy(), expect, rtol=1e-10, atol=1e-12)


def test_entry_clip_gradient_hazard():
    """method.md §1: the logit of a clamped token u gets gradient p_S(u)·Σ_{v unclamped} p_T(v) > 0."""
    lt = rand_logp(1, V, 6)
    g = np.random.default_rng(7)
    X = g.normal(size=(1, V)) * 2
    x = t64(X).requires_grad_(True)
    tau = 0.02
    val, _ = forward_kl(t64(lt), torch.log_softmax(x, -1), "entry", tau)
    val.sum().backward()
    ls = np_log_softmax(X)[0]
    pt, ps = np.exp(lt[0]), np.exp(ls)
    summ = naive_summands(lt[0], ls)
    unclamped = [v for v in range(V) if summ[v] <= tau]
    clamped = [v for v in range(V) if summ[v] > tau]
    assert clamped and unclamped
    mass = sum(pt[v] for v in unclamped)
    for v in range(V):
        expect = ps[v] * mass - (pt[v] if v in unclamped else 0.0)
        assert abs(x.grad[0, v].item() - expect) <= 1e-12
    for u in clamped:
        assert x.grad[0, u].item() > 0


# ---------------------------------------------------------------------------- steered target

H, K = 5, 3


def np_logits(h, W, b):
    return np.array([sum(h[i] * W[v][i] for i in range(len(h))) + (b[v] if b is not None else 0.0) for v in range(len(W))])


@pytest.fixture
def teacher():
    g = np.random.default_rng(11)
    return dict(
        W=g.normal(size=(V, H)),
        b=g.normal(size=V),
        anchor=g.normal(size=(N, H)),
        pos=g.normal(size=(K, N, H)),
        neg=g.normal(size=(2, N, H)),
        pos_mask=np.array([[1, 1, 0, 1, 0, 1], [0, 1, 0, 1, 1, 1], [1, 0, 0, 0, 1, 1]], dtype=bool),
        neg_mask=np.array([[1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=bool),
        lam=g.uniform(0.2, 2.0, size=N),
        scale=g.uniform(0.5, 1.5, size=N),
    )


def naive_steered(tc, *, anchor=True, negative_pool=True, neg=True, lam=1.0, normalize="none", scale=False,
                  negative_branch="mean_log"):
    out, rms_out = [], []
    for r in range(N):
        z0 = np_logits(tc["anchor"][r], tc["W"], tc["b"]) * (tc["scale"][r] if scale else 1.0) if anchor else np.zeros(V)
        pos = [np_log_softmax_row(list(np_logits(tc["pos"][k][r], tc["W"], tc["b"]))) for k in range(K) if tc["pos_mask"][k][r]]
        if not pos:
            d = np.zeros(V)
        else:
            zpos = sum(pos) / len(pos)
            if not negative_pool:
                d = zpos
            else:
                negs = [np_log_softmax_row(list(np_logits(tc["neg"][k][r], tc["W"], tc["b"]))) for k in range(2) if neg and tc["neg_mask"][k][r]]
                if not negs:
                    zneg = np_log_softmax_row(list(z0))
                elif negative_branch == "mean_log":
                    zneg = sum(negs) / len(negs)
                else:  # log_mean: log((1/K) Σ_k p_k), entry by entry
                    zneg = np.array([math.log(sum(math.exp(n[v]) for n in negs) / len(negs)) for v in range(V)])
                d = zpos - zneg
        rms = math.sqrt(sum(v * v for v in d) / V)
        if normalize == "rms":
            d = d / (rms + 1e-12)
            rms = math.sqrt(sum(v * v for v in d) / V)
        lr = lam[r] if isinstance(lam, np.ndarray) else lam
        out.append(z0 + lr * d)
        rms_out.append(rms)
    return np.stack(out), np.array(rms_out)


def make_target(tc, *, anchor=True, negative_pool=True, neg=True, lam=1.0, normalize="none", scale=False,
                negative_branch="mean_log"):
    return TeacherTarget(
        weight=t64(tc["W"]),
        bias=t64(tc["b"]),
        anchor_hidden=t64(tc["anchor"]) if anchor else None,
        anchor_scale=t64(tc["scale"]) if scale else None,
        pos_hidden=t64(tc["pos"]),
        pos_mask=torch.tensor(tc["pos_mask"]),
        neg_hidden=t64(tc["neg"]) if neg else None,
        neg_mask=torch.tensor(tc["neg_mask"]) if neg else None,
        negative_pool=negative_pool,
        negative_branch=negative_branch,
        strength=t64(lam) if isinstance(lam, np.ndarray) else lam,
        normalize=normalize,
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(negative_pool=False),
        dict(neg=False),  # no negative pool at all: zneg = log_softmax(z0)
        dict(normalize="rms"),
        dict(lam="rows", scale=True, normalize="rms"),
        dict(anchor=False),
        dict(anchor=False, neg=False),  # fallback to log_softmax(0) = uniform
        dict(negative_branch="log_mean"),  # RLCSD's marginalisation of the negative pool
        dict(negative_branch="log_mean", lam="rows", scale=True, normalize="rms"),
        dict(negative_branch="log_mean", neg=False),  # no negative context: the same fallback
        dict(negative_branch="log_mean", negative_pool=False),  # nothing subtracted: the option is moot
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
def test_context_pooling(teacher, kw):
    kw = dict(kw)
    if kw.get("lam") == "rows":
        kw["lam"] = teacher["lam"]
    z, rms = steered_logits(make_target(teacher, **kw))
    ez, erms = naive_steered(teacher, **kw)
    assert np.allclose(z.numpy(), ez, rtol=1e-10, atol=1e-10)
    assert np.allclose(rms.numpy(), erms, rtol=1e-10, atol=1e-10)
    assert rms[2].item() == 0.0  # row 2 has no valid positive context: d = 0


def test_empty_negative_row_falls_back_to_anchor_log_softmax(teacher):
    """Row 3 has no valid negative context: d = zpos − log_softmax(z0)."""
    z, _ = steered_logits(make_target(teacher))
    r = 3
    z0 = np_logits(teacher["anchor"][r], teacher["W"], teacher["b"])
    pos = [np_log_softmax_row(list(np_logits(teacher["pos"][k][r], teacher["W"], teacher["b"]))) for k in range(K) if teacher["pos_mask"][k][r]]
    expect = z0 + (sum(pos) / len(pos) - np_log_softmax_row(list(z0)))
    assert np.allclose(z[r].numpy(), expect, rtol=1e-10, atol=1e-10)


def test_sdpo_special_case(teacher):
    """anchor None, negative_pool False, λ = 1: the target is the mean of the positive log-probs."""
    z, _ = steered_logits(make_target(teacher, anchor=False, negative_pool=False, lam=1.0))
    for r in range(N):
        pos = [np_log_softmax_row(list(np_logits(teacher["pos"][k][r], teacher["W"], teacher["b"]))) for k in range(K) if teacher["pos_mask"][k][r]]
        if pos:
            assert np.allclose(z[r].numpy(), sum(pos) / len(pos), rtol=1e-10, atol=1e-10)


def test_strength_zero_gives_anchor(teacher):
    z, _ = steered_logits(make_target(teacher, lam=0.0))
    for r in range(N):
        assert np.allclose(z[r].numpy(), np_logits(teacher["anchor"][r], teacher["W"], teacher["b"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", ["none", "rms"])
@pytest.mark.parametrize("anchor", [True, False])
def test_global_pooling(teacher, normalize, anchor):
    g = np.random.default_rng(12)
    # the direction: mean log-probs along positive rollouts minus along negative ones
    pos_rows, neg_rows = g.normal(size=(7, H)), g.normal(size=(4, H))
    W, b = teacher["W"], teacher["b"]

    def naive_mean(rows):
        return sum(np_log_softmax_row(list(np_logits(h, W, b))) for h in rows) / len(rows)

    d_np = naive_mean(pos_rows) - naive_mean(neg_rows)
    d = mean_log_softmax(t64(pos_rows), t64(W), t64(b), chunk_size=3) - mean_log_softmax(t64(neg_rows), t64(W), t64(b), chunk_size=2)
    assert np.allclose(d.numpy(), d_np, rtol=1e-10, atol=1e-10)
    direction = torch.stack([d, torch.zeros_like(d)])
    row_direction = torch.tensor([0, 1, 0, 0, 1, 0])
    tgt = TeacherTarget(
        weight=t64(W), bias=t64(b), anchor_hidden=t64(teacher["anchor"]) if anchor else None,
        direction=direction, row_direction=row_direction, strength=0.7, normalize=normalize,
    )
    z, rms = steered_logits(tgt)
    for r in range(N):
        dr = d_np if row_direction[r] == 0 else np.zeros(V)
        rr = math.sqrt(sum(v * v for v in dr) / V)
        if normalize == "rms":
            dr = dr / (rr + 1e-12)
            rr = math.sqrt(sum(v * v for v in dr) / V)
        z0 = np_logits(teacher["anchor"][r], W, b) if anchor else np.zeros(V)
        assert np.allclose(z[r].numpy(), z0 + 0.7 * dr, rtol=1e-10, atol=1e-10)
        assert abs(rms[r].item() - rr) <= 1e-10


def test_plain_opsd_special_case(teacher):
    """global pooling with λ = 0 and a privileged anchor: the target is the anchor (plain OPSD)."""
    tgt = TeacherTarget(
        weight=t64(teacher["W"]), bias=t64(teacher["b"]), anchor_hidden=t64(teacher["anchor"]),
        direction=t64(np.ones((1, V))), row_direction=torch.zeros(N, dtype=torch.long), strength=0.0,
    )
    z, _ = steered_logits(tgt)
    for r in range(N):
        assert np.allclose(z[r].numpy(), np_logits(teacher["anchor"][r], teacher["W"], teacher["b"]), rtol=1e-12, atol=1e-12)
