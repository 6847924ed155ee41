"""The chunked loss (losses/chunked.py) against the reference (losses/reference.py).

Values, every per-row stat and the gradients w.r.t. the student hidden states, lm-head weight and
bias must agree to a relative error (max |a − b| / max |b| per tensor) of 1e-10 in float64 and
1e-5 in float32, for every divergence, clip, temperature and steering configuration.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ogls_sd.losses import DivergenceSpec, TeacherTarget, divergence_rows, steered_logits
from ogls_sd.losses import chunked, reference
from ogls_sd.losses.chunked import auto_chunk_size, get_distill_loss, get_token_logprobs

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one torch thread

SPECS = {
    "fkl": DivergenceSpec(),
    "fkl_entry": DivergenceSpec(clip="entry", clip_tau=0.05),
    "fkl_entry_T": DivergenceSpec(clip="entry", clip_tau=0.02, temperature=1.7),
    "fkl_token": DivergenceSpec(clip="token"),  # tau set from the data: see _with_median_tau
    "fkl_T": DivergenceSpec(temperature=0.6),
    "rkl": DivergenceSpec(divergence="reverse_kl"),
    "rkl_token_T": DivergenceSpec(divergence="reverse_kl", clip="token", temperature=1.3),
    "jsd0": DivergenceSpec(divergence="jsd", beta=0.0),
    "jsd05": DivergenceSpec(divergence="jsd", beta=0.5),
    "jsd1": DivergenceSpec(divergence="jsd", beta=1.0),
    "jsd03_token": DivergenceSpec(divergence="jsd", beta=0.3, clip="token", temperature=1.2),
    "sampled": DivergenceSpec(divergence="sampled_token"),
    "sampled_token_T": DivergenceSpec(divergence="sampled_token", clip="token", temperature=0.8),
    "topk": DivergenceSpec(divergence="topk", top_k=5),
    "topk_entry": DivergenceSpec(divergence="topk", top_k=5, clip="entry", clip_tau=0.05),
    "topk_big_k": DivergenceSpec(divergence="topk", top_k=1000, clip="token"),
}

TARGETS = (
    "anchor",
    "ctx",
    "ctx_rms_lam",
    "ctx_no_negative_pool",
    "ctx_k0_negatives",
    "ctx_empty_pools",
    "ctx_no_bias",
    "ctx_log_mean",
    "ctx_log_mean_rms_lam",
    "strength0",
    "global",
    "global_no_anchor",
)


def make_case(target_kind: str, N: int, H: int, V: int, dtype: torch.dtype, seed: int = 0, bias: bool = True):
    """Random student tensors (leaves), a TeacherTarget, row weights with zeros, sampled ids."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    hidden = rnd(N, H)
    weight = rnd(V, H, scale=0.5)
    b = rnd(V, scale=0.5) if bias else None
    t_weight = weight + rnd(V, H, scale=0.2)
    t_bias = rnd(V, scale=0.5)

    def mask(K, p):
        m = torch.rand(K, N, generator=g) < p
        return m

    kw: dict = dict(weight=t_weight, bias=t_bias)
    anchor = hidden + rnd(N, H, scale=0.5)
    if target_kind == "anchor":
        kw.update(anchor_hidden=anchor)
    elif target_kind.startswith("ctx") or target_kind == "strength0":
        pos_mask, neg_mask = mask(3, 0.6), mask(2, 0.5)
        if N > 2:  # ragged: a row without positive context, a row without negative context
            pos_mask[:, 1] = False
            neg_mask[:, 2] = False
        kw.update(
            anchor_hidden=anchor,
            pos_hidden=rnd(3, N, H),
            pos_mask=pos_mask,
            neg_hidden=rnd(2, N, H),
            neg_mask=neg_mask,
            strength=1.0,
        )
        if target_kind.startswith("ctx_log_mean"):  # RLCSD's negative branch: log of the mean probability
            kw.update(negative_branch="log_mean")
        if target_kind.endswith("rms_lam"):
            kw.update(
                normalize="rms",
                strength=torch.rand(N, generator=g, dtype=torch.float64).to(dtype) * 2,
                anchor_scale=torch.rand(N, generator=g, dtype=torch.float64).to(dtype) + 0.5,
            )
        elif target_kind == "ctx_no_negative_pool":
            kw.update(anchor_hidden=None, negative_pool=False, neg_hidden=None, neg_mask=None)
        elif target_kind == "ctx_k0_negatives":
            kw.update(neg_hidden=rnd(0, N, H), neg_mask=torch.zeros(0, N, dtype=torch.bool), strength=0.7)
        elif target_kind == "ctx_empty_pools":
            kw.update(pos_mask=torch.zeros(3, N, dtype=torch.bool), neg_mask=torch.zeros(2, N, dtype=torch.bool))
        elif target_kind == "ctx_no_bias":
            kw.update(bias=None)
        elif target_kind == "strength0":
            kw.update(strength=0.0)
    elif target_kind.startswith("global"):
        kw.update(
            anchor_hidden=None if target_kind == "global_no_anchor" else anchor,
            direction=rnd(2, V),
            row_direction=torch.randint(0, 2, (N,), generator=g),
            normalize="rms" if target_kind == "global" else "none",
            strength=0.8,
        )
    else:  # pragma: no cover
        raise ValueError(target_kind)
    target = TeacherTarget(**kw)
    row_weight = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    row_weight[::3] = 0.0  # zeros act as masks
    ids = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, target, row_weight, ids


def _with_median_tau(spec: DivergenceSpec, case) -> DivergenceSpec:
    """For the token clip: a tau between the per-row values, so that some rows are clipped."""
    if spec.clip != "token":
        return spec
    hidden, weight, b, target, _, ids = case
    with torch.no_grad():
        z, _ = steered_logits(target)
        t_logp = torch.log_softmax(z / spec.temperature, -1)
        s_logp = torch.log_softmax(reference.lm_logits(hidden, weight, b) / spec.temperature, -1)
        v, _ = divergence_rows(t_logp, s_logp, dataclasses.replace(spec, clip="none"), ids)
    srt = v.sort().values
    mid = len(srt) // 2
    tau = float(srt[mid]) if len(srt) == 1 else float((srt[mid - 1] + srt[mid]) / 2)
    return dataclasses.replace(spec, clip_tau=tau)


def _run(fn, case, spec, grad_scale=1.0, **kw):
    hidden, weight, b, target, row_weight, ids = case
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True) if b is not None else None
    out = fn(h, w, bb, target, spec, row_weight, ids, **kw)
    (out.loss * grad_scale).backward()
    grads = [h.grad, w.grad, bb.grad if bb is not None else None]
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a) & torch.isnan(b)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    a = torch.where(both_nan, 0, a).double()
    b = torch.where(both_nan, 0, b).double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff if scale == 0 else diff / max(scale, 1e-300)


def assert_same(ref, ch, ref_grads, ch_grads, dtype):
    tol = TOL[dtype]
    assert ch.loss.dtype == ref.loss.dtype
    assert rel_err(ch.loss.detach(), ref.loss.detach()) <= tol, (ch.loss.item(), ref.loss.item())
    assert set(ch.stats) == set(ref.stats)
    for k in ref.stats:
        assert not ch.stats[k].requires_grad
        assert rel_err(ch.stats[k], ref.stats[k]) <= tol, (k, ch.stats[k], ref.stats[k])
    for name, gr, gc in zip(("hidden", "weight", "bias"), ref_grads, ch_grads):
        assert (gr is None) == (gc is None), name
        if gr is not None:
            assert rel_err(gc, gr) <= tol, name


def check(case, spec, dtype, chunk_size, grad_scale=1.0):
    spec = _with_median_tau(spec, case)
    ref, ref_grads = _run(reference.distill_loss, case, spec, grad_scale)
    ch, ch_grads = _run(chunked.distill_loss, case, spec, grad_scale, chunk_size=chunk_size)
    assert_same(ref, ch, ref_grads, ch_grads, dtype)
    return ref, ch


@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_matches_reference_float64(spec_name, target_kind):
    case = make_case(target_kind, N=13, H=16, V=37, dtype=torch.float64, seed=zlib.crc32(f"{spec_name}/{target_kind}".encode()) % 1000)
    check(case, SPECS[spec_name], torch.float64, chunk_size=4)


@pytest.mark.parametrize("target_kind", ("anchor", "ctx_rms_lam", "ctx_k0_negatives", "ctx_log_mean_rms_lam", "global"))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_matches_reference_float32(spec_name, target_kind):
    case = make_case(target_kind, N=19, H=16, V=101, dtype=torch.float32, seed=7)
    check(case, SPECS[spec_name], torch.float32, chunk_size=8)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize(
    "N,chunk_size",
    [(1, 1), (1, 1024), (2, 1), (13, 4), (13, 5), (13, 13), (13, 64), (16, 8), (31, 7)],
)
@pytest.mark.parametrize("spec_name", ("fkl_entry", "jsd05", "sampled_token_T"))
def test_shapes_and_chunking(spec_name, N, chunk_size, dtype):
    V = 37 if dtype == torch.float64 else 101
    case = make_case("ctx_rms_lam", N=N, H=16, V=V, dtype=dtype, seed=N * 100 + chunk_size)
    check(case, SPECS[spec_name], dtype, chunk_size=chunk_size)


def test_entry_clip_is_exercised():
    """The random data clips some summands but not all (the test above is not vacuous)."""
    case = make_case("ctx", N=13, H=16, V=37, dtype=torch.float64)
    ref, ch = check(case, SPECS["fkl_entry"], torch.float64, chunk_size=4)
    assert 0 < ch.stats["clipped"].sum() < 13 * 37
    assert torch.all(ch.stats["vocab"] == 37)


def test_token_clip_is_exercised():
    case = make_case("ctx", N=13, H=16, V=37, dtype=torch.float64)
    ref, ch = check(case, SPECS["fkl_token"], torch.float64, chunk_size=4)
    assert 0 < ch.stats["clipped"].sum() < 13


@pytest.mark.parametrize("spec_name", ("fkl", "fkl_entry", "rkl", "jsd05", "sampled"))
def test_grad_output_scaling_and_no_bias(spec_name):
    case = make_case("ctx", N=9, H=16, V=37, dtype=torch.float64, bias=False)
    check(case, SPECS[spec_name], torch.float64, chunk_size=4, grad_scale=-2.5)


def test_all_zero_row_weight():
    case = make_case("ctx", N=9, H=16, V=37, dtype=torch.float64)
    case = case[:4] + (torch.zeros(9, dtype=torch.float64),) + case[5:]
    ref, ch = check(case, SPECS["fkl_entry"], torch.float64, chunk_size=4)
    assert ch.loss.item() == 0.0


def test_only_requested_grads_and_frozen_weight():
    """A frozen lm head (LoRA) gets no gradient; the hidden-state gradient still matches."""
    hidden, weight, b, target, rw, ids = make_case("ctx", N=11, H=16, V=37, dtype=torch.float64)
    spec = SPECS["fkl_entry"]
    grads = []
    for fn in (reference.distill_loss, lambda *a: chunked.distill_loss(*a, chunk_size=3)):
        h = hidden.clone().requires_grad_(True)
        out = fn(h, weight, b, target, spec, rw, ids)
        out.loss.backward()
        grads.append(h.grad)
    assert rel_err(grads[1], grads[0]) <= 1e-10


def test_no_grad_mode_gives_values():
    hidden, weight, b, target, rw, ids = make_case("ctx", N=11, H=16, V=37, dtype=torch.float64)
    spec = SPECS["fkl_entry"]
    with torch.no_grad():
        ref = reference.distill_loss(hidden, weight, b, target, spec, rw, ids)
        ch = chunked.distill_loss(hidden, weight, b, target, spec, rw, ids, chunk_size=4)
    assert rel_err(ch.loss, ref.loss) <= 1e-10
    for k in ref.stats:
        assert rel_err(ch.stats[k], ref.stats[k]) <= 1e-10


def test_backward_twice_raises():
    hidden, weight, b, target, rw, ids = make_case("anchor", N=5, H=16, V=37, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    out = chunked.distill_loss(h, weight, b, target, SPECS["fkl"], rw, ids, chunk_size=2)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


@pytest.mark.parametrize("spec_name", ("fkl", "fkl_entry", "jsd05", "jsd0", "sampled"))
def test_infinite_log_probs_fall_back_to_reference_semantics(spec_name):
    """A teacher bias of -inf gives log p̃ = -inf entries: 0·log 0 = 0 as in the reference."""
    hidden, weight, b, target, rw, ids = make_case("anchor", N=7, H=16, V=37, dtype=torch.float64)
    t_bias = target.bias.clone()
    t_bias[[3, 8]] = float("-inf")
    target = dataclasses.replace(target, bias=t_bias)
    ids = torch.where(ids == 3, 4, torch.where(ids == 8, 9, ids))
    case = (hidden, weight, b, target, rw, ids)
    spec = SPECS[spec_name]
    ref, ref_grads = _run(reference.distill_loss, case, spec)
    ch, ch_grads = _run(chunked.distill_loss, case, spec, chunk_size=3)
    assert_same(ref, ch, ref_grads, ch_grads, torch.float64)


def test_empty_batch():
    hidden, weight, b, target, rw, ids = make_case("ctx", N=0, H=16, V=37, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    out = chunked.distill_loss(h, weight, b, target, SPECS["fkl"], rw, ids)
    out.loss.backward()
    assert out.loss.item() == 0.0 and h.grad.shape == (0, 16)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("target_kind", ("ctx_rms_lam", "ctx_log_mean_rms_lam"))
@pytest.mark.parametrize("spec_name", ("fkl_entry", "jsd05", "topk_entry"))
def test_no_tensor_larger_than_a_block(spec_name, target_kind):
    """Nothing of size [N, V] is created: the largest tensor is a [chunk, V] block, grad_W or grad_h
    (also with the running logsumexp of negative_branch=log_mean)."""
    N, H, V, chunk = 96, 8, 37, 8
    hidden, weight, b, target, rw, ids = make_case(target_kind, N=N, H=H, V=V, dtype=torch.float32)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    mode = _MaxNumel()
    with mode:
        out = chunked.distill_loss(h, w, b, target, SPECS[spec_name], rw, ids, chunk_size=chunk)
        out.loss.backward()
    limit = max(chunk * V * 2, V * H, N * H, 3 * N * H)  # a block (topk: [chunk, V] pairs), grads, inputs
    assert mode.max_numel <= limit < N * V


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("temperature", (1.0, 1.3))
@pytest.mark.parametrize("N,chunk_size", [(1, 4), (13, 4), (13, 100)])
def test_token_logprobs(dtype, temperature, N, chunk_size):
    hidden, weight, b, _, _, ids = make_case("anchor", N=N, H=16, V=37, dtype=dtype)
    coef = torch.randn(N, dtype=dtype)
    res = []
    for fn, kw in ((reference.token_logprobs, {}), (chunked.token_logprobs, {"chunk_size": chunk_size})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        lp = fn(h, w, bb, ids, temperature, **kw)
        (lp * coef).sum().backward()
        res.append((lp.detach(), h.grad, w.grad, bb.grad))
    for a, c in zip(res[0], res[1]):
        assert rel_err(c, a) <= TOL[dtype]


def test_dispatch():
    assert get_distill_loss("reference") is reference.distill_loss
    assert get_token_logprobs("reference") is reference.token_logprobs
    with pytest.raises(ValueError):
        get_distill_loss("fused")
    case = make_case("ctx", N=13, H=16, V=37, dtype=torch.float64)
    spec = SPECS["fkl_entry"]
    ref, ref_grads = _run(reference.distill_loss, case, spec)
    for fn in (get_distill_loss("chunked"), get_distill_loss("chunked", chunk_size=5)):
        ch, ch_grads = _run(fn, case, spec)
        assert_same(ref, ch, ref_grads, ch_grads, torch.float64)
    hidden, weight, b, _, _, ids = case
    assert rel_err(get_token_logprobs("chunked")(hidden, weight, b, ids, 1.1), reference.token_logprobs(hidden, weight, b, ids, 1.1)) <= 1e-10


def test_auto_chunk_size():
    assert auto_chunk_size(151936) == 864
    assert auto_chunk_size(151936, 1024) == 128
    assert auto_chunk_size(151936, 4096) == 512
    assert auto_chunk_size(32000, 4096) == 512
    assert auto_chunk_size(32000, 100000) == 1024
    assert auto_chunk_size(37, 5) == 5
    assert auto_chunk_size(37, 0) == 1
    assert auto_chunk_size(10**9) == 1


@pytest.mark.parametrize("spec_name", ("fkl_entry", "fkl_token", "rkl_token_T", "jsd05", "sampled_token_T"))
def test_divergence_in_sub_blocks(monkeypatch, spec_name):
    """The divergence step runs a few rows at a time (tiny scratch): same results."""
    monkeypatch.setattr(chunked, "SCRATCH_ELEMENTS", 3 * 37)
    case = make_case("ctx_k0_negatives", N=13, H=16, V=37, dtype=torch.float64)
    check(case, SPECS[spec_name], torch.float64, chunk_size=8)


def test_log_mean_changes_the_target():
    """The two negative branches give different targets on the same inputs (the option is not ignored),
    and log_mean ≥ mean_log entrywise for zneg (Jensen), so its d is ≤ mean_log's d."""
    _, _, _, target, _, _ = make_case("ctx", N=13, H=16, V=37, dtype=torch.float64)
    target = dataclasses.replace(target, anchor_hidden=None)  # z0 = 0: z̃ = λ d
    z_ml, _ = steered_logits(target)
    z_lm, _ = steered_logits(dataclasses.replace(target, negative_branch="log_mean"))
    with_neg = target.neg_mask.sum(0) > 1  # rows with two valid negatives: the branches differ
    with_neg &= target.pos_mask.sum(0) > 0
    assert bool(with_neg.any())
    assert (z_lm[with_neg] - z_ml[with_neg]).abs().max() > 1e-3
    assert bool((z_lm <= z_ml + 1e-12).all())


def test_unknown_negative_branch_is_refused():
    _, _, _, target, _, _ = make_case("ctx", N=3, H=16, V=37, dtype=torch.float64)
    with pytest.raises(ValueError, match="steering.negative_branch: 'mean_prob'"):
        dataclasses.replace(target, negative_branch="mean_prob")
