"""Baselines of method.md §4 (SFT, RFT, GRPO, OPSD + GRPO) against naive computations, and every
algorithm end to end through the trainer."""

import itertools
import json
import math

import pytest
import torch

from ogls_sd.algorithms import GRPO, OPSDGRPO, RFT, SFT, group_advantages
from ogls_sd.algorithms.grpo import k3_kl, ppo_clip_loss
from ogls_sd.config import ALGORITHMS, Config
from ogls_sd.tasks.arith import ArithTask
from ogls_sd.templates import join_completion
from ogls_sd.trainer import train

from conftest import TINY_OVERRIDES
from test_algorithms import make_batch, setup


def completion_logp(model, prompt, ids, temperature=1.0):
    """log softmax(logits / T) at the positions predicting ``ids`` after ``prompt`` (double)."""
    seq, st = join_completion(prompt, ids)
    logits = model(input_ids=torch.tensor([seq])).logits[0, st - 1 : st - 1 + len(ids)].double()
    return torch.log_softmax(logits / temperature, -1)


def token_logp(model, prompt, ids, temperature=1.0):
    lp = completion_logp(model, prompt, ids, temperature)
    return lp.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), grads(model)


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    for x, y in zip(a, b):
        err = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        assert torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol), err


def step_loss(algo, plan, size=3):
    """Sum of the micro-batch losses of a step (what the trainer backpropagates)."""
    return sum(algo.loss(plan, micro)[0] for micro in plan.micro_batches(size))


# --------------------------------------------------------------------------- GRPO advantages
def test_group_advantages_by_hand():
    r = [1.0, 0.0, 0.0, 0.0]
    # mean 0.25, centred (0.75, -0.25, -0.25, -0.25), sum of squares 0.75
    # sample std (n-1 = 3): sqrt(0.25) = 0.5 -> (1.5, -0.5, -0.5, -0.5)
    assert group_advantages(r, True, "sample", eps=0.0) == pytest.approx([1.5, -0.5, -0.5, -0.5])
    # population std (n = 4): sqrt(0.1875) = sqrt(3)/4 -> (sqrt 3, -1/sqrt 3, ...)
    s3 = math.sqrt(3.0)
    assert group_advantages(r, True, "population", eps=0.0) == pytest.approx([s3, -1 / s3, -1 / s3, -1 / s3])
    # eps sits in the denominator next to the std
    assert group_advantages(r, True, "sample", eps=0.1) == pytest.approx([0.75 / 0.6, -0.25 / 0.6, -0.25 / 0.6, -0.25 / 0.6])
    # Dr. GRPO: no std scaling
    assert group_advantages(r, False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # zero spread (and a group of one) -> all zero, never NaN
    assert group_advantages([1.0, 1.0, 1.0], True, "sample") == [0.0, 0.0, 0.0]
    assert group_advantages([0.0], True, "sample") == [0.0]


def test_default_std_convention_is_sample(tok, tiny_model):
    """The default (grpo.std=sample, eps=1e-4) pinned on a group, and the plan's metrics."""
    cfg, pb, _, algo = setup(tok, tiny_model, "train.algorithm=grpo")
    assert cfg.grpo.std == "sample" and cfg.grpo.scale_std
    batch = make_batch(tok, pb, [[1, 0, 0, 0], [1, 1, 1, 1]])
    plan = algo.plan(batch, 0)
    assert plan.advantages == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])
    assert plan.metrics["grpo/zero_spread_frac"] == 0.5
    assert plan.work == [0, 1, 2, 3]  # zero-advantage rollouts need no student pass
    assert plan.norm == sum(len(r.ids) for r in batch.rollouts)  # but count in the token mean
    _, _, _, dr = setup(tok, tiny_model, "train.algorithm=grpo", "grpo.scale_std=false")
    assert dr.plan(batch, 0).advantages[:4] == pytest.approx([0.75, -0.25, -0.25, -0.25])


# --------------------------------------------------------------------------- PPO clipping
@pytest.mark.parametrize("adv, ratio, zero_grad", [
    (1.0, 1.5, True),    # above 1+eps with A > 0: clipped, no gradient
    (1.0, 0.5, False),   # below 1-eps with A > 0: the unclipped term is the minimum
    (-1.0, 0.5, True),   # below 1-eps with A < 0: clipped
    (-1.0, 1.5, False),  # above 1+eps with A < 0: unclipped
    (1.0, 1.1, False),   # inside the range
    (-1.0, 0.9, False),
])
def test_ppo_clip_gradient(adv, ratio, zero_grad):
    old = torch.tensor([-1.0], dtype=torch.float64)
    logp = (old + math.log(ratio)).clone().requires_grad_(True)
    loss, clipped, r = ppo_clip_loss(logp, old, torch.tensor([adv], dtype=torch.float64), 0.2, 0.2)
    loss.sum().backward()
    assert bool(clipped[0]) == zero_grad
    if zero_grad:
        assert logp.grad.item() == 0.0
        assert loss.item() == pytest.approx(-adv * (1.2 if adv > 0 else 0.8))
    else:
        assert logp.grad.item() == pytest.approx(-adv * ratio)  # d(-rho A)/dlogp = -rho A
        assert loss.item() == pytest.approx(-adv * ratio)


def test_clip_eps_high_is_the_upper_range():
    old = torch.zeros(1, dtype=torch.float64)
    logp = torch.tensor([math.log(1.25)], dtype=torch.float64, requires_grad=True)
    _, clipped, _ = ppo_clip_loss(logp, old, torch.ones(1, dtype=torch.float64), 0.2, 0.28)
    assert not bool(clipped[0])


def test_grpo_loss_matches_naive_and_clipping_zeroes_gradients(tok, tiny_model):
    T = 1.3
    cfg, pb, _, algo = setup(tok, tiny_model, "train.algorithm=grpo", "grpo.inner_steps=2", f"rollout.temperature={T}")
    batch = make_batch(tok, pb, [[1, 0, 0], [0, 1, 1]])
    plan = algo.plan(batch, 0)
    A = plan.advantages
    N = sum(len(r.ids) for r in batch.rollouts)

    def naive():
        tot = 0.0
        for i, r in enumerate(batch.rollouts):
            lp = token_logp(tiny_model, batch.groups[r.group].student_prompt, r.ids, T)
            tot = tot - A[i] * torch.exp(lp - lp.detach()).sum()  # rho = 1 at the first inner step
        return tot / N

    # inner_steps > 1: old log-probs were computed in plan(), before any update, at temperature T
    for i, r in enumerate(batch.rollouts):
        want = token_logp(tiny_model, batch.groups[r.group].student_prompt, r.ids, T).detach()
        assert torch.allclose(plan.old_logprobs[i].double(), want, rtol=1e-5, atol=1e-6)
    got, g_got = loss_and_grads(tiny_model, lambda: step_loss(algo, plan))
    want, g_want = loss_and_grads(tiny_model, naive)
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-7)
    assert_grads_close(g_got, g_want)
    # ratio exp(log 2) = 2 > 1 + eps for the positive-advantage rollouts -> no gradient from them
    pos = [i for i in plan.work if A[i] > 0]
    for i in pos:
        plan.old_logprobs[i] = plan.old_logprobs[i] - math.log(2.0)
    tiny_model.zero_grad(set_to_none=True)
    loss, m = algo.loss(plan, pos)
    loss.backward()
    assert m["grpo_clipped_sum"] == m["grpo_tokens"] > 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in tiny_model.parameters())


def test_grpo_sequence_mean_and_kl_term_match_naive(tok, tiny_model):
    beta = 0.3
    cfg, pb, teacher, algo = setup(tok, tiny_model, "train.algorithm=grpo", f"grpo.kl_coef={beta}",
                                   "grpo.reduction=sequence_mean")
    # move the policy away from the frozen teacher copy (the KL reference)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(tok, pb, [[1, 0, 0], [1, 1, 1]])
    plan = algo.plan(batch, 0)
    assert plan.work == list(range(6))  # the KL term needs every rollout
    A = plan.advantages

    def naive():
        tot = 0.0
        for i, r in enumerate(batch.rollouts):
            p = batch.groups[r.group].student_prompt
            lp = token_logp(tiny_model, p, r.ids)
            with torch.no_grad():
                ref = token_logp(teacher.copy, p, r.ids)
            per_tok = -A[i] * torch.exp(lp - lp.detach()) + beta * k3_kl(lp, ref)
            tot = tot + per_tok.mean()
        return tot / len(batch.rollouts)

    got, g_got = loss_and_grads(tiny_model, lambda: step_loss(algo, plan))
    want, g_want = loss_and_grads(tiny_model, naive)
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-7)
    assert_grads_close(g_got, g_want)
    assert float(k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0]))) == 0.0


# --------------------------------------------------------------------------- SFT / RFT
def test_rft_loss_is_nll_of_correct_rollouts_only(tok, tiny_model):
    _, pb, _, algo = setup(tok, tiny_model, "train.algorithm=rft")
    assert isinstance(algo, RFT)
    batch = make_batch(tok, pb, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    plan = algo.plan(batch, 0)
    correct = [i for i, r in enumerate(batch.rollouts) if r.correct]
    assert plan.items == correct == [0, 2, 7]

    def naive():
        lps = [token_logp(tiny_model, batch.groups[batch.rollouts[i].group].student_prompt, batch.rollouts[i].ids)
               for i in correct]
        return -torch.cat(lps).mean()

    got, g_got = loss_and_grads(tiny_model, lambda: step_loss(algo, plan, size=2))
    want, g_want = loss_and_grads(tiny_model, naive)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert_grads_close(g_got, g_want)
    # an incorrect rollout alone contributes nothing (it is not even a work item)
    assert all(i in correct for micro in plan.micro_batches(2) for i in micro)


def test_sft_loss_is_nll_of_references(tok, tiny_model):
    cfg, pb, _, algo = setup(tok, tiny_model, "train.algorithm=sft")
    assert isinstance(algo, SFT) and not algo.needs_rollouts
    batch = make_batch(tok, pb, [[], [], []])  # no rollouts at all
    plan = algo.plan(batch, 0)
    refs = [pb.text_ids(g.example.reference) + [tok.eos_token_id] for g in batch.groups]
    assert [plan.targets[gi] for gi in range(3)] == refs

    def naive():
        return -torch.cat([token_logp(tiny_model, g.student_prompt, ids) for g, ids in zip(batch.groups, refs)]).mean()

    got, g_got = loss_and_grads(tiny_model, lambda: step_loss(algo, plan, size=2))
    want, g_want = loss_and_grads(tiny_model, naive)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert_grads_close(g_got, g_want)
    # sft.max_tokens truncates (and then no EOS)
    _, _, _, short = setup(tok, tiny_model, "train.algorithm=sft", "sft.max_tokens=5")
    p2 = short.plan(batch, 0)
    assert p2.targets[0] == refs[0][:5] and p2.metrics["sft/truncated"] == 1.0


# --------------------------------------------------------------------------- OPSD + GRPO
def test_opsd_grpo_is_grpo_plus_alpha_opsd(tok, tiny_model):
    alpha = 0.5
    _, pb, _, hyb = setup(tok, tiny_model, "train.algorithm=opsd_grpo", f"hybrid.alpha={alpha}")
    assert isinstance(hyb, OPSDGRPO) and isinstance(hyb.grpo, GRPO)
    _, _, _, grpo = setup(tok, tiny_model, "train.algorithm=grpo")
    _, _, _, opsd = setup(tok, tiny_model, "train.algorithm=opsd")
    batch = make_batch(tok, pb, [[1, 0, 0], [0, 0, 0], [1, 1, 0]])
    hp = hyb.plan(batch, 0)
    got, g_got = loss_and_grads(tiny_model, lambda: step_loss(hyb, hp, size=4))
    lg, g_g = loss_and_grads(tiny_model, lambda: step_loss(grpo, grpo.plan(batch, 0), size=2))
    lo, g_o = loss_and_grads(tiny_model, lambda: step_loss(opsd, opsd.plan(batch, 0), size=5))
    assert float(lo) != 0.0 and any(float(g.abs().sum()) > 0 for g in g_g if g is not None)  # GRPO: equal lengths can make the loss value 0, never its gradient
    assert torch.allclose(got.double(), (lg + alpha * lo).double(), rtol=1e-5, atol=1e-8)
    assert_grads_close(g_got, [a + alpha * b for a, b in zip(g_g, g_o)])
    assert {"grpo/zero_spread_frac", "groups/all_incorrect"} <= set(hp.metrics)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.fixture
def alternating_rewards(monkeypatch):
    """Rewards 1, 0, 1, 0, ... in the trainer's rollout order: every group of 4 is mixed, so each
    algorithm has a gradient (the tiny model with a 2-step warm start is never right on its own)."""
    counter = itertools.count()
    monkeypatch.setattr(ArithTask, "reward", lambda self, completion, answer: float(next(counter) % 2 == 0))


EXPECTED_KEYS = {
    "ogls_sd": {"kl/token", "groups/mixed", "tail_nll"},
    "opsd": {"kl/token", "distill_loss"},
    "sft": {"sft/nll", "sft/ref_len_mean"},
    "rft": {"rft/nll", "rft/rollouts", "reward/mean"},
    "grpo": {"grpo/zero_spread_frac", "grpo/adv_std", "grpo/clip_frac", "grpo/ratio_mean", "reward/mean"},
    "opsd_grpo": {"grpo/zero_spread_frac", "hybrid/grpo_loss", "hybrid/opsd_loss", "kl/token"},
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_training_steps_end_to_end(tmp_path, ws_cache, alternating_rewards, algorithm):
    out = tmp_path / "run"
    cfg = Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={ws_cache}", f"train.output_dir={out}",
                                              f"train.algorithm={algorithm}", "train.steps=2", "eval.before_after=false"])
    summary = train(cfg)
    assert summary["algorithm"] == algorithm and summary["steps"] == 2
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    expected = EXPECTED_KEYS.get(algorithm, set())  # an algorithm added later checks its own keys in its tests
    assert expected <= set(recs[0]), expected - set(recs[0])
    assert all(math.isfinite(v) for r in recs for v in r.values())
    assert recs[0]["grad_norm"] > 0
    if algorithm == "sft":
        assert "reward/mean" not in recs[0] and "completion/len_mean" not in recs[0]
    else:
        assert recs[0]["reward/mean"] == 0.5
    if algorithm == "grpo":
        assert recs[0]["grpo/zero_spread_frac"] == 0.0 and recs[0]["grpo/ratio_mean"] == pytest.approx(1.0)
    assert (out / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()


def test_opsd_grpo_with_lora_kl_and_inner_steps_end_to_end(tmp_path, ws_cache, alternating_rewards):
    """The hybrid under LoRA (teacher = adapter disabled, also the KL reference) with 2 inner steps."""
    out = tmp_path / "run"
    cfg = Config.load(None, TINY_OVERRIDES + [
        f"warmstart.cache_dir={ws_cache}", f"train.output_dir={out}", "train.algorithm=opsd_grpo", "train.steps=2",
        "eval.before_after=false", "model.lora=true", "model.lora_target_modules=q_proj,v_proj", "model.lora_r=4",
        "model.lora_alpha=8", "grpo.kl_coef=0.1", "grpo.inner_steps=2", "train.lr=0.01"])
    train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["grad_norm"] > 0
    assert recs[1]["grpo/kl_token"] > 0  # the adapter moved the policy away from the reference
    assert (out / "checkpoints" / "step_000002" / "model" / "adapter_model.safetensors").is_file()


def test_grpo_inner_steps_take_several_optimizer_steps(tmp_path, ws_cache, alternating_rewards):
    out = tmp_path / "run"
    cfg = Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={ws_cache}", f"train.output_dir={out}",
                                              "train.algorithm=grpo", "grpo.inner_steps=3", "train.steps=1",
                                              "eval.before_after=false", "train.lr=0.01"])
    train(cfg)
    st = torch.load(out / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=True)
    assert {float(s["step"]) for s in st["optimizer"]["state"].values()} == {3.0}
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # later inner steps move the policy away from pi_old: the mean ratio is no longer exactly 1
    assert rec["grpo/ratio_mean"] != 1.0


def test_build_algorithm_knows_every_name(tok, tiny_model):
    for name in ALGORITHMS:
        _, _, _, algo = setup(tok, tiny_model, f"train.algorithm={name}")
        assert algo.name == name
