"""Empty rollouts (a backend that returned no token) are skipped by every algorithm and counted as
the step metric ``rollouts/empty``; loss normalisers and row weights stay in float32 with bf16
hidden states (a step's weights sum to 1)."""

import copy
import json
import math

import pytest
import torch

from ogls_sd.algorithms import Group, StepBatch
from ogls_sd.config import ALGORITHMS, Config
from ogls_sd.rollout import Completion
from ogls_sd.trainer import train

from conftest import TINY_OVERRIDES
from test_algorithms import make_batch, setup

# every algorithm that generates rollouts, in the settings that used to fail on an empty one
ROLLOUT_ALGOS = {
    "ogls_context": ["steering.pooling=context"],
    "ogls_context_seq": ["steering.pooling=context", "loss.reduction=sequence_mean"],
    "ogls_global": ["steering.pooling=global"],
    "ogls_global_seq": ["steering.pooling=global", "loss.reduction=sequence_mean"],
    "ogls_global_reference": ["steering.pooling=global", "steering.no_positive=reference"],
    "opsd": ["train.algorithm=opsd"],
    "opsd_seq": ["train.algorithm=opsd", "loss.reduction=sequence_mean"],
    "rft": ["train.algorithm=rft"],
    "grpo": ["train.algorithm=grpo"],
    "grpo_seq_kl": ["train.algorithm=grpo", "grpo.reduction=sequence_mean", "grpo.kl_coef=0.1", "grpo.inner_steps=2"],
    "opsd_grpo": ["train.algorithm=opsd_grpo", "loss.reduction=sequence_mean", "steering.tail_weight=0"],
}
# Rewards per group and which rollouts come back empty: a negative of a mixed group; every
# positive of group 1 (a global pool of only empty rollouts); every negative of group 2 (all the
# distillation targets empty: sequence_mean divided by their length 0).
REWARDS = [[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
PARTLY_EMPTY = [1, 4, 5, 9, 10, 11]


def empty(batch: StepBatch, which) -> StepBatch:
    for i in which:
        batch.rollouts[i].ids = []
        batch.rollouts[i].finished = False
    return batch


def without(batch: StepBatch, which) -> StepBatch:
    """The same step with the rollouts ``which`` removed (indices renumbered)."""
    keep = [i for i in range(len(batch.rollouts)) if i not in set(which)]
    new = {old: k for k, old in enumerate(keep)}
    groups = [Group(g.example, g.student_prompt, g.teacher_prompt, [new[i] for i in g.rollouts if i in new])
              for g in batch.groups]
    return StepBatch(groups, [copy.copy(batch.rollouts[i]) for i in keep])


def step(model, algo, batch):
    """Plan, then the summed micro-batch losses and their gradient, as the trainer takes them."""
    plan = algo.plan(batch, 0)
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for micro in plan.micro_batches(3):
        assert all(batch.rollouts[i].ids for i in micro), "an empty rollout reached a micro-batch"
        loss, _ = algo.loss(plan, micro)
        loss.backward()
        total = total + loss.detach().double()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return plan, total, grads


@pytest.mark.parametrize("name", sorted(ROLLOUT_ALGOS))
def test_partly_empty_rollouts_are_skipped_and_counted(tok, tiny_model, name):
    _, pb, _, algo = setup(tok, tiny_model, *ROLLOUT_ALGOS[name])
    batch = empty(make_batch(tok, pb, REWARDS), PARTLY_EMPTY)
    plan, loss, grads = step(tiny_model, algo, batch)
    assert plan.metrics["rollouts/empty"] == len(PARTLY_EMPTY)
    assert math.isfinite(float(loss)) and all(torch.isfinite(g).all() for g in grads)
    assert any(torch.count_nonzero(g) > 0 for g in grads)  # the non-empty rollouts still train
    if not name.startswith(("grpo", "opsd_grpo")):
        # skipped = as if the backend had not returned them at all (GRPO keeps their rewards in
        # the group baseline, so its advantages differ)
        _, pb2, _, algo2 = setup(tok, tiny_model, *ROLLOUT_ALGOS[name])
        _, want, want_grads = step(tiny_model, algo2, without(make_batch(tok, pb2, REWARDS), PARTLY_EMPTY))
        assert torch.allclose(loss, want, rtol=1e-5, atol=1e-7)
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ROLLOUT_ALGOS))
def test_all_empty_rollouts_give_a_zero_step(tok, tiny_model, name):
    _, pb, _, algo = setup(tok, tiny_model, *ROLLOUT_ALGOS[name])
    batch = make_batch(tok, pb, REWARDS)
    batch = empty(batch, range(len(batch.rollouts)))
    plan, loss, grads = step(tiny_model, algo, batch)
    assert plan.metrics["rollouts/empty"] == len(batch.rollouts)
    assert plan.micro_batches(3) == [] and float(loss) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_global_direction_of_a_pool_of_empty_rollouts_is_zero(tok, tiny_model):
    """Every positive of group 1 is empty: with no_positive=reference the group steers toward the
    reference; an empty reference as the only positive gives no direction (not an error)."""
    _, pb, _, algo = setup(tok, tiny_model, "steering.pooling=global", "steering.no_positive=reference")
    batch = empty(make_batch(tok, pb, [[1, 1, 0, 0]]), [0, 1])
    plan = algo.plan(batch, 0)
    assert plan.metrics["no_positive/reference"] == 1 and sorted(plan.targets) == [2, 3]
    assert plan.directions is not None and torch.count_nonzero(plan.directions) > 0
    g = batch.groups[0]
    g.example = type(g.example)(g.example.problem, "", g.example.answer, g.example.id)
    plan = algo.plan(batch, 0)
    assert torch.count_nonzero(plan.directions) == 0


# ------------------------------------------------------------------------------- end to end


class HalfEmpty:
    """A rollout backend that returns no token for every ``every``-th prompt (all with every=1)."""

    def __init__(self, inner, every: int):
        self.inner, self.every = inner, every

    def generate(self, prompts, params):
        comps = self.inner.generate(prompts, params)
        return [Completion([], False) if k % self.every == 0 else c for k, c in enumerate(comps)]

    def sync_weights(self, model=None):
        self.inner.sync_weights(model)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def ws_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.mark.parametrize("every", [1, 2], ids=["all_empty", "half_empty"])
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "sft"])
def test_training_with_a_backend_that_returns_no_tokens(tmp_path, ws_cache, monkeypatch, algorithm, every):
    import ogls_sd.trainer as trainer

    real = trainer.build_backend
    monkeypatch.setattr(trainer, "build_backend", lambda *a, **k: HalfEmpty(real(*a, **k), every))
    out = tmp_path / "run"
    cfg = Config.load(None, TINY_OVERRIDES + [
        f"warmstart.cache_dir={ws_cache}", f"train.output_dir={out}", f"train.algorithm={algorithm}",
        "eval.before_after=false", "loss.reduction=sequence_mean", "grpo.reduction=sequence_mean",
        "steering.distill_on=all", "steering.no_positive=opsd"])
    train(cfg)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    n = cfg.train.prompts_per_step * cfg.rollout.num_generations
    assert rec["rollouts/empty"] == (n if every == 1 else n // 2)
    assert all(v is None or math.isfinite(v) for v in rec.values() if isinstance(v, (int, float)))


# ------------------------------------------------------------------------ float32 row weights


def bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_distillation_row_weights_are_float32_and_sum_to_one_in_bf16(tok, tiny_model, reduction):
    model = bf16(tiny_model)
    _, pb, _, algo = setup(tok, model, "train.algorithm=opsd", f"loss.reduction={reduction}")
    seen = []
    real = algo.distill

    def spy(h, w, b, target, spec, row_weight, ids):
        assert h.dtype == torch.bfloat16  # the premise: bf16 hidden states
        seen.append(row_weight)
        return real(h, w, b, target, spec, row_weight, ids)

    algo.distill = spy
    batch = make_batch(tok, pb, [[1, 0, 0], [0, 0, 1], [1, 1, 0]])
    plan = algo.plan(batch, 0)
    for micro in plan.micro_batches(2):
        algo.loss(plan, micro)
    assert len(seen) > 1 and all(w.dtype == torch.float32 for w in seen)
    assert abs(float(torch.cat(seen).double().sum()) - 1.0) < 1e-6


def _ones_logprobs(h, w, b, ids, temperature=1.0):
    """log-probs of -1 per token in the hidden dtype: the NLL terms are then their token weights."""
    return -torch.ones(len(ids), dtype=h.dtype, device=h.device) + 0.0 * h.sum()


@pytest.mark.parametrize("name", ["rft", "sft", "tail"])
def test_nll_normalisers_are_float32_in_bf16(tok, tiny_model, name):
    model = bf16(tiny_model)
    extra = {"rft": ["train.algorithm=rft"], "sft": ["train.algorithm=sft"],
             "tail": ["steering.tail_weight=1", "steering.tail_tokens=7"]}[name]
    _, pb, _, algo = setup(tok, model, *extra)
    algo.token_logprobs = _ones_logprobs
    if name == "sft":  # references of 29, 29, 32, 27 and 29 tokens: 1/146 is not a bf16 number
        batch = StepBatch(make_batch(tok, pb, [[1]] * 5).groups, [])
    else:
        batch = make_batch(tok, pb, [[1, 1, 0], [1, 0, 1], [1, 1, 1]])
    plan = algo.plan(batch, 0)
    key = {"rft": "rft_nll", "sft": "sft_nll", "tail": "tail_nll"}[name]
    terms = [algo.loss(plan, micro)[1][key] for micro in plan.micro_batches(1 if name == "sft" else 2)]
    assert len(terms) > 1
    assert abs(sum(terms) - 1.0) < 1e-6


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_grpo_token_weights_are_float32_in_bf16(tok, tiny_model, monkeypatch, reduction):
    import ogls_sd.algorithms.grpo as grpo

    model = bf16(tiny_model)
    _, pb, _, algo = setup(tok, model, "train.algorithm=grpo", f"grpo.reduction={reduction}")

    def unit_loss(lp, old, adv, lo, hi):  # every token's loss is 1: the step loss is the weights' sum
        assert lp.dtype == torch.bfloat16
        return torch.ones_like(lp) + 0.0 * lp, torch.zeros_like(lp, dtype=torch.bool), torch.ones_like(lp)

    monkeypatch.setattr(grpo, "ppo_clip_loss", unit_loss)
    batch = make_batch(tok, pb, [[1, 0, 0], [0, 0, 1], [1, 1, 0]])
    plan = algo.plan(batch, 0)
    losses = [algo.loss(plan, micro)[0] for micro in plan.micro_batches(2)]
    assert len(losses) > 1 and all(x.dtype == torch.float32 for x in losses)
    assert abs(sum(float(x.detach()) for x in losses) - 1.0) < 1e-6
