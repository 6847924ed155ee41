"""RLCSD (train.algorithm=rlcsd): the advantage modulation by hand, the negative branch against a
naive loop, the hint pools, the shared template, and the loss against a naive float64 computation
with a teacher that differs from the student."""

import json
import math

import pytest
import torch

from ogls_sd.algorithms import StepBatch
from ogls_sd.algorithms.grpo import group_advantages
from ogls_sd.algorithms.rlcsd import RLCSD, RLCSDConfig
from ogls_sd.config import Config, ConfigError
from ogls_sd.losses import rlcsd as mod
from ogls_sd.tasks.arith import TEMPLATES
from ogls_sd.teacher import Teacher
from ogls_sd.templates import PromptBuilder

from ogls_sd.trainer import train

from conftest import TINY_OVERRIDES
from test_algorithms import make_batch
from test_baselines import alternating_rewards, assert_grads_close, loss_and_grads, token_logp, ws_cache  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- pure functions
def test_advantage_modulation_by_hand():
    """Two rollouts of a group of 8 with one correct (A = 2.4749, -0.35355), three tokens each;
    RLCSD's constants (scale 0.5, tau 0.02, delta 0.02, clamp +-2), every number worked out in float64."""
    scale, tau, delta = 0.5, 0.02, 0.02
    A = group_advantages([1.0] + [0.0] * 7)
    # mean 1/8, sample std sqrt(0.875 / 7) = 0.353553 -> 0.875 / 0.353553, -0.125 / 0.353553
    assert A[:2] == pytest.approx([2.474874, -0.353553], abs=1e-3)
    a_pos, a_neg = A[0], A[1]
    # per token: (advantage, contrast e_t)
    toks = [(a_pos, 0.05), (a_pos, -0.1), (a_pos, 0.0002), (a_neg, 0.03), (a_neg, -0.2), (a_neg, 0.0)]
    want_r, want_sel, want_a = [], [], []
    for a, e in toks:
        r = min(2.0, max(-2.0, scale * math.tanh(e / tau)))
        sel = abs(r) > delta
        raw = a + (r if sel else 0.0)
        want_r.append(r)
        want_sel.append(sel)
        want_a.append(max(raw, 0.0) if a > 0 else min(raw, 0.0))
    # the worked numbers: tanh(2.5) = 0.98661, tanh(-5) = -0.99991, tanh(0.01) = 0.0099997, tanh(1.5) = 0.905148
    assert want_r[0] == pytest.approx(0.493307, abs=1e-6) and want_r[1] == pytest.approx(-0.499955, abs=1e-6)
    assert want_sel == [True, True, False, True, True, False]
    assert want_a[1] == pytest.approx(2.474874 - 0.499955, abs=1e-3)
    assert want_a[3] == 0.0  # -0.353553 + 0.452574 > 0 -> clamped to 0: the sign of A is kept
    assert want_a[4] == pytest.approx(-0.353553 - 0.499977, abs=1e-3)
    adv = torch.tensor([a for a, _ in toks], dtype=torch.float64)
    e = torch.tensor([x for _, x in toks], dtype=torch.float64)
    r = mod.residual(e, scale, tau)
    sel = mod.gate(r, delta)
    got = mod.modulated_advantage(adv, r, sel)
    assert torch.allclose(r, torch.tensor(want_r, dtype=torch.float64), atol=1e-12)
    assert sel.tolist() == want_sel
    assert torch.allclose(got, torch.tensor(want_a, dtype=torch.float64), atol=1e-12)
    # without the sign-preserving clamp token 3 flips: -0.353553 + 0.5 tanh(1.5) > 0
    free = mod.modulated_advantage(adv, r, sel, sign_preserving=False)
    assert float(free[3]) == pytest.approx(a_neg + 0.5 * math.tanh(1.5), abs=1e-12) and float(free[3]) > 0
    # A = 0 gives 0 under the clamp, A + r without it
    z = mod.modulated_advantage(torch.zeros(1, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64),
                                torch.tensor([True]))
    assert float(z[0]) == 0.0


def test_residual_clamp_and_no_squash():
    e = torch.tensor([-1.0, 0.01, 3.0], dtype=torch.float64)
    r = mod.residual(e, 4.0, 0.5, "tanh", -1.0, 3.0)
    want = [max(-1.0, min(3.0, 4.0 * math.tanh(x / 0.5))) for x in e.tolist()]
    assert torch.allclose(r, torch.tensor(want, dtype=torch.float64)) and float(r[0]) == -1.0
    lin = mod.residual(e, 0.5, 123.0, "none", -2.0, 2.0)
    assert torch.allclose(lin, torch.tensor([-0.5, 0.005, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="rlcsd.squash"):
        mod.residual(e, 1.0, 1.0, "sigmoid")


@pytest.mark.parametrize("mode", mod.NEGATIVE_BRANCHES)
def test_negative_branch_matches_naive_loop(mode):
    g = torch.Generator().manual_seed(0)
    K, N = 4, 9
    lp = torch.log_softmax(torch.randn(K, N, 7, generator=g, dtype=torch.float64), -1)[..., 0]
    valid = torch.rand(K, N, generator=g) > 0.4
    valid[0, :] = True  # every position has at least one negative context
    valid[:, 3] = False
    valid[2, 3] = True  # a position with exactly one
    got = mod.negative_branch(lp, valid, mode)
    for n in range(N):
        vals = [float(lp[k, n]) for k in range(K) if valid[k, n]]
        if mode == "log_mean":
            want = math.log(sum(math.exp(v) for v in vals) / len(vals))
        else:
            want = sum(vals) / len(vals)
        assert float(got[n]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert float(got[3]) == pytest.approx(float(lp[2, 3]), abs=1e-12)  # K = 1: both modes give log p
    # Jensen: the log of the mean probability is never below the mean of the log-probabilities
    if mode == "log_mean":
        assert bool((got >= mod.negative_branch(lp, valid, "mean_log") - 1e-12).all())
    pos = torch.randn(N, generator=g, dtype=torch.float64)
    assert torch.allclose(mod.contrast(pos, lp, valid, mode), pos - got)


def test_negative_branch_rejects_a_position_without_negatives():
    lp = torch.zeros(2, 3)
    valid = torch.tensor([[True, False, True], [True, False, False]])
    with pytest.raises(ValueError, match="without any negative"):
        mod.negative_branch(lp, valid)
    with pytest.raises(ValueError, match="rlcsd.negative_branch"):
        mod.negative_branch(lp, torch.ones(2, 3, dtype=torch.bool), "mean_prob")


def test_two_path_weights_are_two_token_means():
    sel = torch.tensor([True, False, True, False, False])
    w = mod.two_path_weights(sel, 2.0, 3.0, 0.7, torch.float64)
    assert w.tolist() == pytest.approx([0.35, 1 / 3, 0.35, 1 / 3, 1 / 3])
    assert mod.two_path_weights(sel, 0.0, 3.0, 1.0)[0] == 0.0


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="rlcsd.clip_low"):
        RLCSDConfig(clip_low=1.0, clip_high=0.5)
    with pytest.raises(ConfigError, match="rlcsd.negative_branch"):
        RLCSDConfig(negative_branch="max")
    with pytest.raises(ConfigError, match="rlcsd.num_negatives"):
        RLCSDConfig(num_negatives=0)


# --------------------------------------------------------------------------- the algorithm
def make_rlcsd(tok, model, kind="frozen", **rl):
    cfg = Config.load(None, ["train.algorithm=grpo", "rollout.temperature=1.3"])
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    teacher = Teacher(model, kind, cfg.teacher.resolve_ema_decay(cfg.train.algorithm))
    algo = RLCSD(model, teacher, pb, RLCSDConfig(**rl), cfg.grpo, cfg.loss, temperature=1.3, plan_batch=3, seed=5)
    return pb, teacher, algo


def test_hint_pools_exclude_the_target_and_drop_unpaired_rollouts(tok, tiny_model):
    pb, _, algo = make_rlcsd(tok, tiny_model, num_negatives=2)
    # group 0: 2 correct, 3 wrong; group 1: 1 correct, 3 wrong; group 2: all wrong; group 3: 3 correct, 1 wrong
    batch = make_batch(tok, pb, [[1, 1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0], [1, 1, 1, 0]])
    for trial in range(20):
        hints, counts = algo.select_hints(batch, trial)
        for i, h in hints.items():
            g = batch.rollouts[i].group
            assert h.positive != i and i not in h.negatives
            assert batch.rollouts[h.positive].correct and batch.rollouts[h.positive].group == g
            assert all(not batch.rollouts[k].correct and batch.rollouts[k].group == g for k in h.negatives)
            assert len(set(h.negatives)) == len(h.negatives) == min(2, sum(
                1 for k in batch.groups[g].rollouts if not batch.rollouts[k].correct and k != i))
        # group 1's only correct rollout has no correct sibling; group 3's only wrong one no wrong sibling;
        # the all-wrong group 2 contributes nothing
        dropped = {5, 15}
        assert set(hints) == set(range(len(batch.rollouts))) - dropped - {9, 10, 11}, trial
        assert counts["rlcsd/unpaired_rollouts"] == 2.0 and counts["groups/all_incorrect"] == 0.25
    # the draws of a group do not depend on the other groups of the step (data-parallel ranks)
    alone = StepBatch([batch.groups[3]], batch.rollouts)
    assert {i: h for i, h in algo.select_hints(alone, 7)[0].items()} == {
        i: h for i, h in algo.select_hints(batch, 7)[0].items() if batch.rollouts[i].group == 3}
    # over the trials every sibling of each pool shows up (random choice, not the first one)
    seen = {h.positive for t in range(20) for h in algo.select_hints(batch, t)[0].values()
            if batch.rollouts[h.positive].group == 3}
    assert seen == {12, 13, 14}


def test_one_template_for_both_branches(tok, tiny_model):
    pb, _, algo = make_rlcsd(tok, tiny_model)
    batch = make_batch(tok, pb, [[1, 0, 0, 1]])
    pos, neg = algo.context(batch, 0), algo.context(batch, 1)
    att_p = pb.clean_attempt(batch.rollouts[0].ids, 256)
    att_n = pb.clean_attempt(batch.rollouts[1].ids, 256)
    assert att_p != att_n and len(pos) - len(att_p) == len(neg) - len(att_n)
    # pos = pre + att_p + post and neg = pre + att_n + post for one split: the prompts differ by the hint only
    splits = [s for s in range(len(pos) - len(att_p) + 1)
              if pos[:s] == neg[:s] and pos[s : s + len(att_p)] == att_p and neg[s : s + len(att_n)] == att_n
              and pos[s + len(att_p):] == neg[s + len(att_n):]]
    assert splits
    assert pos == pb.context_ids(batch.groups[0].example, batch.rollouts[0].ids, 256)


def naive_step_loss(student, teacher_model, batch, plan, rl, pb, T=1.3):
    """The RLCSD objective of the plan's hints, from per-token float64 log-probs."""
    sel_terms, uns_terms, n_sel, n_uns = [], [], 0, 0
    for i, h in sorted(plan.hints.items()):
        ro = batch.rollouts[i]
        ex = batch.groups[ro.group].example

        def ctx(j):
            return pb.context_ids(ex, batch.rollouts[j].ids, rl.max_context_tokens, rl.strip_think)

        with torch.no_grad():
            pos = token_logp(teacher_model, ctx(h.positive), ro.ids, T)
            negs = [token_logp(teacher_model, ctx(k), ro.ids, T) for k in h.negatives]
        lp = token_logp(student, batch.groups[ro.group].student_prompt, ro.ids, T)
        A = plan.advantages[i]
        for t in range(len(ro.ids)):
            if rl.negative_branch == "log_mean":
                nb = math.log(sum(math.exp(float(n[t])) for n in negs) / len(negs))
            else:
                nb = sum(float(n[t]) for n in negs) / len(negs)
            e = float(pos[t]) - nb
            r = min(rl.clip_high, max(rl.clip_low, rl.scale * math.tanh(e / rl.tau)))
            ratio = torch.exp(lp[t] - lp[t].detach())  # one inner step: ratio 1, gradient of log p
            if abs(r) > rl.delta:
                a = max(A + r, 0.0) if A > 0 else (min(A + r, 0.0) if A < 0 else 0.0)
                sel_terms.append(-a * ratio)
                n_sel += 1
            else:
                uns_terms.append(-A * ratio)
                n_uns += 1
    tot = torch.zeros((), dtype=torch.float64)
    if n_sel:
        tot = tot + rl.eta * sum(sel_terms) / n_sel
    if n_uns:
        tot = tot + sum(uns_terms) / n_uns
    return tot, n_sel, n_uns


@pytest.mark.parametrize("branch", mod.NEGATIVE_BRANCHES)
def test_loss_matches_naive_with_a_teacher_that_differs_from_the_student(tok, tiny_model, branch):
    # tau 0.5 and delta 0.1: both paths have tokens on the tiny model
    pb, teacher, algo = make_rlcsd(tok, tiny_model, negative_branch=branch, tau=0.5, delta=0.1, eta=0.7,
                                   num_negatives=2)
    with torch.no_grad():  # the student moves away from the frozen teacher copy
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(tok, pb, [[1, 0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0]])
    plan = algo.plan(batch, 3)
    assert plan.n_selected > 0 and plan.n_unselected > 0
    assert sorted(plan.hints) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    want_loss, want_g = loss_and_grads(
        tiny_model, lambda: naive_step_loss(tiny_model, teacher.copy, batch, plan, algo.rlcsd, pb)[0])
    _, n_sel, n_uns = naive_step_loss(tiny_model, teacher.copy, batch, plan, algo.rlcsd, pb)
    assert (n_sel, n_uns) == (plan.n_selected, plan.n_unselected)
    got_loss, got_g = loss_and_grads(tiny_model, lambda: sum(algo.loss(plan, m)[0] for m in plan.micro_batches(4)))
    assert torch.allclose(got_loss.double(), want_loss, rtol=1e-5, atol=1e-7)
    assert_grads_close(got_g, want_g)
    assert plan.metrics["rlcsd/kept_rollouts"] == 9.0 and 0 < plan.metrics["rlcsd/selected_frac"] < 1
    # the contexts are scored by the teacher weights, which now differ from the student's
    ctx0, ids0 = algo.context(batch, plan.hints[0].positive), batch.rollouts[0].ids
    with torch.no_grad():
        assert not torch.allclose(token_logp(teacher.copy, ctx0, ids0, 1.3), token_logp(tiny_model, ctx0, ids0, 1.3),
                                  atol=1e-4)


def test_zero_scale_is_grpo_on_the_kept_rollouts(tok, tiny_model):
    pb, _, algo = make_rlcsd(tok, tiny_model, scale=0.0)
    batch = make_batch(tok, pb, [[1, 0, 0, 1], [1, 0, 1, 0]])
    plan = algo.plan(batch, 0)
    assert plan.n_selected == 0
    N = sum(len(batch.rollouts[i].ids) for i in plan.hints)

    def naive():
        tot = 0.0
        for i in sorted(plan.hints):
            r = batch.rollouts[i]
            lp = token_logp(tiny_model, batch.groups[r.group].student_prompt, r.ids, 1.3)
            tot = tot - plan.advantages[i] * torch.exp(lp - lp.detach()).sum()
        return tot / N

    got, g_got = loss_and_grads(tiny_model, lambda: sum(algo.loss(plan, m)[0] for m in plan.micro_batches(3)))
    want, g_want = loss_and_grads(tiny_model, naive)
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-7)
    assert_grads_close(g_got, g_want)


def test_all_same_outcome_groups_give_no_loss(tok, tiny_model):
    pb, _, algo = make_rlcsd(tok, tiny_model)
    batch = make_batch(tok, pb, [[1, 1, 1], [0, 0, 0]])
    plan = algo.plan(batch, 0)
    assert plan.hints == {} and plan.micro_batches(4) == []
    assert plan.metrics["groups/all_correct"] == 0.5 and plan.metrics["groups/all_incorrect"] == 0.5
    loss, m = algo.loss(plan, [0, 1, 2])
    assert float(loss.detach()) == 0.0 and m == {}


def test_constructor_rejects_what_rlcsd_does_not_have(tok, tiny_model):
    cfg = Config.load(None, ["grpo.kl_coef=0.1"])
    pb = PromptBuilder(tok, cfg.templates, TEMPLATES)
    t = Teacher(tiny_model, "live")
    with pytest.raises(ValueError, match="grpo.kl_coef"):
        RLCSD(tiny_model, t, pb, RLCSDConfig(), cfg.grpo, cfg.loss)
    with pytest.raises(ValueError, match="teacher"):
        RLCSD(tiny_model, None, pb, RLCSDConfig(), Config.load(None, []).grpo, cfg.loss)


# --------------------------------------------------------------------------- through the registry and the trainer
def test_registered_with_its_section_teacher_and_compare_methods():
    from ogls_sd import compare
    from ogls_sd.algorithms import algorithm_spec, teacher_kind

    cfg = Config.load(None, ["train.algorithm=rlcsd", "rlcsd.scale=1.5", "rlcsd.negative_branch=mean_log"])
    assert cfg.rlcsd.scale == 1.5 and cfg.rlcsd.negative_branch == "mean_log"
    assert teacher_kind(cfg) == "live" and algorithm_spec(cfg).needs_siblings
    assert compare.METHODS["rlcsd"][:2] == ("rlcsd", [])
    assert compare.METHODS["rlcsd_meanlog"][:2] == ("rlcsd", ["rlcsd.negative_branch=mean_log"])
    with pytest.raises(ConfigError, match="rlcsd.negative_branch"):
        Config.load(None, ["train.algorithm=rlcsd", "rlcsd.negative_branch=logmean"])


@pytest.mark.parametrize("extra", [[], ["rlcsd.negative_branch=mean_log", "grpo.inner_steps=2", "teacher.kind=ema"]],
                         ids=["defaults", "meanlog_inner_ema"])
def test_training_steps_end_to_end(tmp_path, ws_cache, alternating_rewards, extra):
    out = tmp_path / "run"
    cfg = Config.load(None, TINY_OVERRIDES + [
        f"warmstart.cache_dir={ws_cache}", f"train.output_dir={out}", "train.algorithm=rlcsd", "train.steps=2",
        "eval.before_after=false", "rlcsd.tau=0.5", "train.micro_batch_size=3", *extra])
    summary = train(cfg)
    assert summary["algorithm"] == "rlcsd" and summary["steps"] == 2 and summary["noop_steps"] == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    r0 = recs[0]
    want = {"rlcsd/kept_rollouts", "rlcsd/selected_frac", "rlcsd/e_abs_mean", "rlcsd/selected_loss",
            "grpo/pg_loss", "grpo/clip_frac", "groups/mixed"}
    assert want <= set(r0), want - set(r0)
    # rewards 1, 0, 1, 0 in every group of 4: each rollout has a sibling of each outcome; a correct
    # target gets both incorrect siblings as negatives, an incorrect one the other one: K = 1.5 on average
    n = cfg.train.prompts_per_step * cfg.rollout.num_generations
    assert r0["rlcsd/kept_rollouts"] == n and r0["groups/mixed"] == 1.0 and r0["rlcsd/negatives_mean"] == 1.5
    assert r0["grad_norm"] > 0 and r0["rlcsd/e_abs_mean"] > 0
    assert all(math.isfinite(v) for r in recs for v in r.values() if isinstance(v, (int, float)))
