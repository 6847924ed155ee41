"""SDPO (TRL 1.16 semantics): per-token losses against TRL's own functions and a naive float64
reference, the re-prompt built from a successful sibling on token ids, and the step loss on a
tiny model against a by-hand computation."""

import copy
import math

import pytest
import torch

from ogls_sd.algorithms.sdpo import SDPO, TRL_REPROMPT, TRL_SOLUTION, SDPOConfig, demonstrations
from ogls_sd.config import ConfigError
from ogls_sd.losses.sdpo import sdpo_loss, token_losses
from ogls_sd.teacher import Teacher
from ogls_sd.templates import join_completion

from test_algorithms import make_batch, setup
from test_baselines import assert_grads_close, completion_logp, grads

pytestmark = pytest.mark.usefixtures("one_thread")

# (mode, alpha, top_k, add_tail): every mode, the divergence's three regimes, both top-k supports
CASES = [
    ("sampled_token", 1.0, 0, False),
    ("full_logits", 0.0, 0, False), ("full_logits", 0.3, 0, False), ("full_logits", 1.0, 0, False),
    ("topk_logits", 0.0, 4, False), ("topk_logits", 0.5, 4, False), ("topk_logits", 1.0, 4, False),
    ("topk_logits", 0.0, 4, True), ("topk_logits", 0.7, 4, True), ("topk_logits", 1.0, 4, True),
]


def random_logits(seed, shape=(3, 5, 13)):
    g = torch.Generator().manual_seed(seed)
    s = (2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    w = torch.rand(shape[:-1], generator=g, dtype=torch.float64)
    return s, t, ids, w


def ours(s, t, ids, mode, alpha, k, tail):
    V = s.shape[-1]
    return token_losses(s.reshape(-1, V), t.reshape(-1, V), ids.reshape(-1), mode, alpha, k or 20, tail).reshape(ids.shape)


def value_and_grad(fn, s, w):
    s.grad = None
    loss = fn()
    (loss * w).sum().backward()
    return loss.detach(), s.grad.clone()


# --------------------------------------------------------------------------- (a) TRL 1.16 peer values
@pytest.mark.parametrize("mode,alpha,k,tail", CASES)
def test_token_losses_equal_trl_loss_utils(mode, alpha, k, tail):
    trl = pytest.importorskip("trl", reason="TRL is the peer (the bench extra: pip install -e '.[bench]')")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the peer test pins TRL 1.16.0, found {trl.__version__}")
    from trl.experimental.sdpo import loss_utils as L

    s, t, ids, w = random_logits(1)

    def peer():
        if mode == "sampled_token":
            return L.compute_sampled_token_self_distillation_loss(s, t, ids, distillation_alpha=alpha)
        if mode == "full_logits":
            return L.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha)
        return L.compute_topk_self_distillation_loss(s, t, distillation_topk=k, distillation_alpha=alpha,
                                                     distillation_add_tail=tail)

    want, want_grad = value_and_grad(peer, s, w)
    got, got_grad = value_and_grad(lambda: ours(s, t, ids, mode, alpha, k, tail), s, w)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got - want).abs().max()
    assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-12), (got_grad - want_grad).abs().max()


# --------------------------------------------------------------------------- (b) naive float64 reference
def naive_divergence(ps, pt, alpha):
    """D_alpha of two probability vectors, term by term."""
    def kl(p, q):
        return sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(len(p)) if p[v] > 0)
    if alpha == 0.0:
        return kl(pt, ps)
    if alpha == 1.0:
        return kl(ps, pt)
    m = [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)]
    return alpha * kl(pt, m) + (1 - alpha) * kl(ps, m)


def naive_row(srow, trow, y, mode, alpha, k, tail):
    """One position's SDPO loss value with plain Python arithmetic on probabilities."""
    def softmax(x):
        e = [math.exp(v - max(x)) for v in x]
        return [v / sum(e) for v in e]
    ps, pt = softmax(srow), softmax(trow)
    if mode == "sampled_token":
        return (math.log(ps[y]) - math.log(pt[y])) * math.log(ps[y])
    if mode == "full_logits":
        return naive_divergence(ps, pt, alpha)
    top = sorted(range(len(srow)), key=lambda v: -srow[v])[:k]
    ps_k, pt_k = [ps[v] for v in top], [pt[v] for v in top]
    if tail:
        ps_k, pt_k = ps_k + [1 - sum(ps_k)], pt_k + [1 - sum(pt_k)]
    else:
        ps_k, pt_k = [p / sum(ps_k) for p in ps_k], [p / sum(pt_k) for p in pt_k]
    return naive_divergence(ps_k, pt_k, alpha)


@pytest.mark.parametrize("mode,alpha,k,tail", CASES)
def test_token_losses_match_naive_values_and_finite_difference_gradients(mode, alpha, k, tail):
    s, t, ids, w = random_logits(2, (4, 9))
    got, got_grad = value_and_grad(lambda: ours(s, t, ids, mode, alpha, k, tail), s, w)
    for r in range(4):
        want = naive_row(s[r].tolist(), t[r].tolist(), int(ids[r]), mode, alpha, k, tail)
        assert got[r].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    if mode == "sampled_token":  # the score function: sg(s_y - t_y) (onehot(y) - p_S), not d(value)
        s_lp, t_lp = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
        adv = (s_lp - t_lp).gather(-1, ids[:, None])
        want_grad = w[:, None] * adv * (torch.nn.functional.one_hot(ids, 9) - s_lp.exp())
        assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-12)
        return
    eps = 1e-6  # central differences of the naive value (the top-k support does not move for small eps)
    for r in range(4):
        for v in range(9):
            up, dn = s[r].tolist(), s[r].tolist()
            up[v] += eps
            dn[v] -= eps
            fd = (naive_row(up, t[r].tolist(), 0, mode, alpha, k, tail)
                  - naive_row(dn, t[r].tolist(), 0, mode, alpha, k, tail)) / (2 * eps)
            assert got_grad[r, v].item() == pytest.approx(w[r].item() * fd, rel=1e-5, abs=1e-8)


def test_sampled_token_needs_alpha_one():
    s, t, ids, _ = random_logits(3, (2, 5))
    with pytest.raises(ValueError, match="sdpo.alpha"):
        token_losses(s, t, ids, "sampled_token", alpha=0.5)
    with pytest.raises(ConfigError, match="sdpo.alpha"):
        SDPOConfig(mode="sampled_token", alpha=0.5)


@pytest.mark.parametrize("mode,alpha,k,tail", CASES)
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_blocked_loss_on_hidden_states_equals_loss_on_logits(mode, alpha, k, tail, chunk):
    g = torch.Generator().manual_seed(4)
    N, H, V, T = 7, 5, 11, 0.7
    h_s = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b_s = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    ids, rw = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g, dtype=torch.float64)
    kw = dict(mode=mode, alpha=alpha, top_k=k or 20, add_tail=tail)
    loss, per_token, stats = sdpo_loss(h_s, w_s, b_s, h_t, w_t, None, ids, rw, temperature=T, chunk_size=chunk, **kw)
    loss.backward()
    got = [x.grad.clone() for x in (h_s, w_s, b_s)]
    for x in (h_s, w_s, b_s):
        x.grad = None
    x_logits, z_logits = (h_s @ w_s.T + b_s) / T, (h_t @ w_t.T) / T
    want_rows = token_losses(x_logits, z_logits, ids, **kw)
    (want_rows * rw).sum().backward()
    assert torch.allclose(per_token, want_rows.detach(), rtol=1e-12)
    assert torch.allclose(loss, (want_rows * rw).sum(), rtol=1e-12)
    for a, b in zip(got, (h_s.grad, w_s.grad, b_s.grad)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    s_lp, t_lp = torch.log_softmax(x_logits.detach(), -1), torch.log_softmax(z_logits, -1)
    p_s, p_t = s_lp.exp(), t_lp.exp()
    want_stats = [(p_t * (t_lp - s_lp)).sum(-1), (p_s * (s_lp - t_lp)).sum(-1), -(p_t * t_lp).sum(-1), -(p_s * s_lp).sum(-1)]
    assert torch.allclose(stats, torch.stack(want_stats), rtol=1e-10)


# --------------------------------------------------------------------------- (c) the teacher prompt
def test_demonstration_is_the_first_other_success_of_the_group():
    assert demonstrations([0, 1, 0, 1], 1.0, exclude_self=True) == [1, 3, 1, 1]
    assert demonstrations([0, 1, 0, 1], 1.0, exclude_self=False) == [1, 1, 1, 1]
    assert demonstrations([1, 0, 0], 1.0, exclude_self=True) == [None, 0, 0]  # the only success: no teacher
    assert demonstrations([0, 0, 0], 1.0, exclude_self=True) == [None] * 3
    assert demonstrations([0.5, 0.9, 1.0], 0.9, exclude_self=True) == [1, 2, 1]


def sdpo_setup(tok, model, temperature=1.0, kind="frozen", **sdpo):
    """A :class:`SDPO` on the tiny model with a ``kind`` teacher and ``SDPOConfig(**sdpo)``."""
    _, pb, _, _ = setup(tok, model)
    teacher = Teacher(model, kind, 0.95)
    algo = SDPO(model, teacher, pb, SDPOConfig(**sdpo), temperature=temperature, chunk_size=5, teacher_batch=2)
    return pb, teacher, algo


def distinct_batch(tok, pb, rewards_per_group):
    """:func:`make_batch` with every rollout made unique (its index in front), so that two correct
    rollouts of a group are different demonstrations."""
    batch = make_batch(tok, pb, rewards_per_group)
    for i, r in enumerate(batch.rollouts):
        r.ids = pb.text_ids(f"{i} ") + r.ids
    return batch


def test_reprompt_is_trl_template_around_the_demonstration_ids(tok, tiny_model):
    pb, _, algo = sdpo_setup(tok, tiny_model)
    batch = distinct_batch(tok, pb, [[0, 1, 0, 1], [1, 0, 0], [0, 0, 0]])
    plan = algo.plan(batch, step=0)
    # group 0: rollouts 0..3, group 1: 4..6 (4 is the only success), group 2: none
    assert plan.demo == {0: 1, 1: 3, 2: 1, 3: 1, 5: 4, 6: 4}
    assert plan.n_seq == 10 and plan.metrics["sdpo/success_group_frac"] == pytest.approx(2 / 3)
    for i, j in plan.demo.items():
        ex, demo = batch.groups[batch.rollouts[i].group].example, batch.rollouts[j].ids
        prompt = plan.teacher_prompts[i]
        assert prompt == pb.reprompt_ids(ex, demo, TRL_REPROMPT, TRL_SOLUTION)
        # TRL's string formatting of the decoded demonstration, rendered like the student prompt
        user = TRL_REPROMPT.format(prompt=pb._fill("student", ex), feedback="",
                                   solution=TRL_SOLUTION.format(successful_previous_attempt=tok.decode(demo, skip_special_tokens=True)))
        assert tok.decode(prompt) == pb._render(user, False)
        # the demonstration's ids (EOS stripped) sit in the prompt as they were sampled
        body = demo[:-1]
        assert any(prompt[a : a + len(body)] == body for a in range(len(prompt)))
        seq, start = join_completion(prompt, batch.rollouts[i].ids)
        assert seq[start:] == batch.rollouts[i].ids and seq[:start] == prompt
    # a correct rollout is distilled toward ANOTHER success: rollout 1's prompt holds rollout 3, not itself
    assert plan.teacher_prompts[1] != plan.teacher_prompts[0]
    _, _, self_ok = sdpo_setup(tok, tiny_model, dont_reprompt_on_self_success=False)
    assert self_ok.plan(batch, 0).demo == {0: 1, 1: 1, 2: 1, 3: 1, 4: 4, 5: 4, 6: 4}


def test_context_prompt_is_the_projects_context_template_around_the_demonstration(tok, tiny_model):
    pb, _, algo = sdpo_setup(tok, tiny_model, prompt="context")
    batch = distinct_batch(tok, pb, [[0, 1, 0, 1]])
    plan = algo.plan(batch, 0)
    assert plan.demo == {0: 1, 1: 3, 2: 1, 3: 1}
    for i, j in plan.demo.items():
        demo = batch.rollouts[j].ids
        assert plan.teacher_prompts[i] == pb.context_ids(batch.groups[0].example, demo, len(demo))
        assert tok.decode(plan.teacher_prompts[i]).count(tok.decode(demo[:-1])) == 1


def test_reprompt_truncates_from_the_left(tok, tiny_model):
    pb, _, algo = sdpo_setup(tok, tiny_model, max_reprompt_tokens=30)
    batch = distinct_batch(tok, pb, [[0, 1]])
    plan = algo.plan(batch, 0)
    full = pb.reprompt_ids(batch.groups[0].example, batch.rollouts[1].ids, TRL_REPROMPT, TRL_SOLUTION)
    assert plan.teacher_prompts[0] == full[-30:] and len(full) > 30


@pytest.mark.parametrize("key,value,msg", [
    ("reprompt_template", "{prompt}\n", "{solution} exactly once"),
    ("reprompt_template", "{prompt}{solution}{oops}", "unknown placeholder"),
    ("solution_template", "attempt: {attempt}", "unknown placeholder"),
    ("solution_template", "no attempt", "{successful_previous_attempt} exactly once"),
])
def test_bad_templates_are_config_errors(key, value, msg):
    with pytest.raises(ConfigError, match=f"sdpo.{key}.*" + msg.replace("{", r"\{").replace("}", r"\}")):
        SDPOConfig(**{key: value})


# --------------------------------------------------------------------------- the step loss by hand
def naive_step_loss(student, teacher_model, tok, batch, plan, mode, alpha, k, tail, T):
    """(1/B) Σ_i mean_t ℓ_{i,t}: student on the student prompt, teacher on the re-prompt (float64)."""
    total = 0.0
    for i, prompt in plan.teacher_prompts.items():
        r = batch.rollouts[i]
        s_lp = completion_logp(student, batch.groups[r.group].student_prompt, r.ids, T)
        with torch.no_grad():
            t_lp = completion_logp(teacher_model, prompt, r.ids, T)
        ids = torch.tensor(r.ids)
        total = total + token_losses(s_lp, t_lp, ids, mode, alpha, k, tail).mean()
    return total / plan.n_seq


@pytest.mark.parametrize("mode,alpha,k,tail", [CASES[0], CASES[2], CASES[8]])
def test_step_loss_and_gradients_match_the_naive_computation(tok, tiny_model, mode, alpha, k, tail):
    pb, teacher, algo = sdpo_setup(tok, tiny_model, temperature=0.8, mode=mode, alpha=alpha, top_k=k or 20,
                                   add_tail=tail)
    with torch.no_grad():  # the student moves away from the frozen teacher: a swap would show
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = distinct_batch(tok, pb, [[0, 1, 0, 1], [1, 0, 0]])
    plan = algo.plan(batch, 0)
    tiny_model.zero_grad(set_to_none=True)
    got = sum(algo.loss(plan, m)[0] for m in plan.micro_batches(2))
    got.backward()
    got_grads = grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)
    want = naive_step_loss(tiny_model, teacher.copy, tok, batch, plan, mode, alpha, k or 20, tail, 0.8)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert_grads_close(got_grads, grads(tiny_model))
    swapped = naive_step_loss(teacher.copy, tiny_model, tok, batch, plan, mode, alpha, k or 20, tail, 0.8)
    assert abs(float(swapped) - float(want.detach())) > 1e-3 * abs(float(want.detach()))


def test_rollouts_without_a_demonstration_get_no_gradient_but_count_in_the_mean(tok, tiny_model):
    pb, _, algo = sdpo_setup(tok, tiny_model)
    batch = distinct_batch(tok, pb, [[1, 0, 0], [0, 0, 0]])
    plan = algo.plan(batch, 0)
    assert sorted(plan.teacher_prompts) == [1, 2] and plan.n_seq == 6
    assert [m for m in plan.micro_batches(8)] == [[1, 2]]
    loss, _ = algo.loss(plan, [0, 3, 4, 5])
    assert float(loss) == 0.0 and not loss.requires_grad  # no student pass at all


# --------------------------------------------------------------------------- (d) registered, end to end
def test_sdpo_is_registered_with_an_ema_teacher_and_its_compare_methods(tok, tiny_model):
    from ogls_sd.algorithms import build_algorithm, teacher_kind
    from ogls_sd.compare import DEFAULT_METHODS, METHODS
    from ogls_sd.config import Config

    cfg = Config.load(None, ["train.algorithm=sdpo", "sdpo.mode=topk_logits", "sdpo.top_k=7", "rollout.temperature=0.6"])
    assert teacher_kind(cfg) == "ema" and cfg.sdpo.top_k == 7
    _, pb, teacher, _ = setup(tok, tiny_model)
    algo = build_algorithm(cfg, tiny_model, teacher, pb)
    assert isinstance(algo, SDPO) and algo.name == "sdpo" and algo.temperature == 0.6 and algo.cfg.mode == "topk_logits"
    assert METHODS["sdpo"] == ("sdpo", ["teacher.kind=ema", "teacher.ema_decay=0.95"], METHODS["sdpo"][2])
    assert "sdpo" in DEFAULT_METHODS and {"sdpo_full", "sdpo_topk", "sdpo_live", "sdpo_ctx"} <= set(METHODS)
    with pytest.raises(ConfigError, match="sdpo.mode"):
        Config.load(None, ["sdpo.mode=topk"])
    with pytest.raises(ConfigError, match="rollout.num_generations"):
        Config.load(None, ["train.algorithm=sdpo", "rollout.num_generations=1"])


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.mark.parametrize("extra", [[],  # TRL's defaults by auto: an EMA teacher with decay 0.95, sampled tokens
                                   ["sdpo.mode=full_logits", "sdpo.alpha=0.5", "teacher.kind=live"]],
                         ids=["sampled_token_ema", "full_logits_live"])
def test_two_training_steps_end_to_end(tmp_path, ws_cache, monkeypatch, extra):
    import itertools
    import json

    from conftest import TINY_OVERRIDES
    from ogls_sd.tasks.arith import ArithTask
    from ogls_sd.config import Config
    from ogls_sd import teacher as teacher_mod
    from ogls_sd import trainer
    from ogls_sd.trainer import train

    built = []  # the (policy, kind, decay) the trainer builds its teacher with
    monkeypatch.setattr(trainer, "Teacher", lambda *a, **k: built.append(a[1:3]) or teacher_mod.Teacher(*a, **k))
    counter = itertools.count()  # rewards 1, 0, 1, 0, ...: every rollout of a group of 4 has a successful sibling
    monkeypatch.setattr(ArithTask, "reward", lambda self, completion, answer: float(next(counter) % 2 == 0))
    out = tmp_path / "run"
    cfg = Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={ws_cache}", f"train.output_dir={out}",
                                              "train.algorithm=sdpo", "train.steps=2", "eval.before_after=false",
                                              "train.lr=0.01", *extra])
    summary = train(cfg)
    assert summary["algorithm"] == "sdpo" and summary["steps"] == 2
    assert built == [("live" if extra else "ema", 0.95)]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["sdpo/reprompt_frac"] == 1.0 and r["sdpo/success_group_frac"] == 1.0 and r["targets"] == 8
        assert r["grad_norm"] > 0 and all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float)))
    # step 1: the teacher equals the student (EMA starts at theta_0; live is theta) and only the re-prompt
    # differs; step 2 scores with the moved weights
    assert recs[1]["sdpo/reverse_kl_token"] > 0 and recs[1]["kl/token"] > 0 and recs[1]["entropy/teacher"] > 0
    ck = out / "checkpoints" / "step_000002"
    assert (ck / "model" / "model.safetensors").is_file()


def test_bf16_model_gives_the_float32_loss_to_bf16_rounding(tok, tiny_model):
    """The softmax math runs in float32 whatever the model dtype (losses/sdpo.py)."""
    pb, _, algo32 = sdpo_setup(tok, tiny_model, mode="full_logits", alpha=0.5)
    batch = distinct_batch(tok, pb, [[0, 1, 0, 1]])
    plan = algo32.plan(batch, 0)
    want, _ = algo32.loss(plan, sorted(plan.teacher_prompts))
    model16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    _, _, algo16 = sdpo_setup(tok, model16, mode="full_logits", alpha=0.5)
    got, m = algo16.loss(algo16.plan(batch, 0), sorted(plan.teacher_prompts))
    assert got.dtype == torch.float32 and math.isfinite(m["kl_sum"])
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=0.05)
    got.backward()
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model16.parameters())


# --------------------------------------------------------------------------- data parallel
DP_CASES = {
    "sdpo_ema": "sdpo,teacher.kind=ema,teacher.ema_decay=0.5",
    "sdpo_topk_tail_live": "sdpo,sdpo.mode=topk_logits,sdpo.top_k=5,sdpo.add_tail=true,teacher.kind=live",
    "sdpo_full_lora": "sdpo,sdpo.mode=full_logits,sdpo.alpha=0.3,model.lora=true,model.lora_r=4,model.lora_alpha=8",
}


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    from test_data_parallel import run_worker_pair

    return run_worker_pair(tmp_path_factory.mktemp("dp"), DP_CASES)


@pytest.mark.parametrize("case", list(DP_CASES))
def test_two_ranks_take_the_single_process_step(dp_runs, case):
    """tests/test_data_parallel.py's check for sdpo: two gloo ranks with half the prompt groups each
    take the single process's optimizer step (B summed over ranks), float64."""
    from safetensors.torch import load_file

    from test_data_parallel import check_ranks_report_the_single_step

    single = load_file(dp_runs / case / "ws1_rank0.safetensors")
    r0, r1 = load_file(dp_runs / case / "ws2_rank0.safetensors"), load_file(dp_runs / case / "ws2_rank1.safetensors")
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"{case}: replicas diverged at {k}"
        torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-10)
    check_ranks_report_the_single_step(dp_runs / case, "ws2", case)
