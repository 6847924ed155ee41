"""OGLS-SD's anchor (teacher weights of z0 and of the context passes, docs/algorithms/ogls_sd.md):
for every ``teacher.kind`` (frozen θ₀, EMA, live θ), with full fine-tuning and with LoRA, the
steered target the algorithm builds equals the target computed by hand from an independent copy
of the intended weights. The policy is trained a few steps first, so θ, θ₀ and the EMA all differ
and a mix-up of any two shows. (Two processes: tests/test_data_parallel.py checks that 2 ranks
take the single-process step for the same kinds.)"""

import copy

import pytest
import torch

from ogls_sd.algorithms import build_algorithm
from ogls_sd.config import Config
from ogls_sd.teacher import Teacher
from ogls_sd.losses.target import steered_logits
from ogls_sd.templates import join_completion

from test_algorithms import make_batch, setup
from test_teacher import _train_steps


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def _naive_target(net, pb, batch, lam: float, i: int = 1, pos: int = 0, neg: int = 2):
    """log p̃ for rollout ``i``: log_softmax(z0 + λ(log p(ctx pos) − log p(ctx neg))), float64, with ``net``."""
    g, r = batch.groups[0], batch.rollouts[i]

    def logits(prompt):
        seq, st = join_completion(prompt, r.ids)
        return net(input_ids=torch.tensor([seq])).logits[0, st - 1 : st - 1 + len(r.ids)].double()

    with torch.no_grad():
        z0 = logits(g.student_prompt)
        zpos = torch.log_softmax(logits(pb.context_ids(g.example, batch.rollouts[pos].ids, 256)), -1)
        zneg = torch.log_softmax(logits(pb.context_ids(g.example, batch.rollouts[neg].ids, 256)), -1)
        return torch.log_softmax(z0 + lam * (zpos - zneg), -1)


def _built_target(algo, batch, i: int = 1):
    plan = algo.plan(batch, 0)
    t = algo._teacher_target([plan.targets[i]], batch, plan)
    return plan, t


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["frozen", "ema", "live"])
def test_anchor_kind_builds_the_intended_target(tok, tiny_model, kind, lora):
    lam, decay = 0.7, 0.5
    over = [f"teacher.kind={kind}", f"teacher.ema_decay={decay}", f"steering.strength={lam}", "steering.tail_weight=0"]
    base0 = copy.deepcopy(tiny_model)  # θ₀ (for LoRA: the base without adapter)
    policy = _lora(tiny_model) if lora else tiny_model
    if lora:  # a non-zero adapter from the start, so that adapter on / off / averaged all differ
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    cfg, pb, _, _ = setup(tok, policy, *over)
    teacher = Teacher(policy, cfg.teacher.resolve("ogls_sd"), cfg.teacher.resolve_ema_decay("ogls_sd"), lora=lora)
    algo = build_algorithm(cfg, policy, teacher, pb)
    assert teacher.kind == kind
    if lora:  # no second full copy of the model under LoRA
        assert teacher.copy is None
    start = copy.deepcopy(policy)  # θ at the moment the teacher was built (the EMA's first value)
    ema = {n: p.detach().clone().double() for n, p in start.named_parameters()}
    batch = make_batch(tok, pb, [[1, 0, 0]])
    # train: θ moves away from θ₀; the EMA follows by the naive formula
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-2)
    for step in range(3):
        plan = algo.plan(batch, step)
        loss, _ = algo.loss(plan, sorted(plan.targets))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update()
        with torch.no_grad():
            for n, p in policy.named_parameters():
                ema[n] = decay * ema[n] + (1 - decay) * p.detach().double()
    # the intended teacher network, built independently of ogls_sd.teacher
    if kind == "live":
        net = policy
    elif kind == "frozen":
        net = base0
    else:
        net = copy.deepcopy(policy)
        with torch.no_grad():
            for n, p in net.named_parameters():
                trainable = dict(policy.named_parameters())[n].requires_grad
                if trainable or not lora:
                    p.copy_(ema[n].to(p.dtype))
    net.eval()
    want = _naive_target(net, pb, batch, lam)
    plan, t = _built_target(algo, batch)
    got = torch.log_softmax(steered_logits(t)[0].double(), -1)
    assert torch.allclose(got, want, atol=2e-5), (kind, lora, (got - want).abs().max())
    # ... and differs from what each other kind would have given (the test can tell them apart)
    others = {"live": policy, "frozen": base0}
    for k, other in others.items():
        if k != kind:
            other.eval()
            assert not torch.allclose(got, _naive_target(other, pb, batch, lam), atol=1e-4), f"{kind} looks like {k}"
    # the policy itself is unchanged by teacher passes (an EMA adapter is swapped back)
    h = {n: p.detach().clone() for n, p in policy.named_parameters()}
    algo.plan(batch, 9)
    assert all(torch.equal(p, h[n]) for n, p in policy.named_parameters())


def test_auto_teacher_kind_resolves_per_algorithm():
    assert Config.load(None, []).teacher.kind == "auto"
    for algo, want in [("ogls_sd", "live"), ("opsd", "frozen"), ("opsd_grpo", "frozen"), ("grpo", "frozen")]:
        assert Config.load(None, [f"train.algorithm={algo}"]).teacher.resolve(algo) == want
    assert Config.load(None, ["teacher.kind=ema"]).teacher.resolve("ogls_sd") == "ema"
