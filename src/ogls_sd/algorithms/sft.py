"""Supervised baselines (method.md §4): SFT on reference solutions and rejection-sampling SFT (RFT).

* **SFT**: ``L = −(1/N) Σ_x Σ_t log π_θ(y*_t | student_prompt(x), y*_<t)`` over the step's prompts,
  where ``y*`` is the reference solution's token ids followed by EOS (truncated to
  ``sft.max_tokens`` when set, then without EOS) and ``N`` the number of such tokens in the step
  (token mean over the step). No rollouts are generated (``needs_rollouts = False``).
* **RFT**: the same NLL on the model's own *correct* rollouts only (``r_i = 1``; their exact sampled
  ids, EOS included when the rollout finished), token mean over all tokens of the step's correct
  rollouts. Incorrect rollouts get no gradient; a step without a correct rollout has no loss.

Both use temperature 1 (the model's own distribution), whatever the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import LossConfig, SFTConfig
from ..losses import get_token_logprobs
from ..modeling import SeqBatch, completion_hidden, lm_head
from ..templates import PromptBuilder, join_completion
from .base import Algorithm, EMPTY_METRIC, StepBatch, StepPlan, chunks, loss_dtype, register_algorithm, student_hidden


@dataclass
class NLLPlan(StepPlan):
    """Work items (group indices for SFT, rollout indices for RFT) and the step's token count."""

    batch: StepBatch
    items: list[int]
    targets: dict[int, list[int]]  # SFT: group -> reference ids (+ EOS); RFT: unused
    norm: float
    metrics: dict[str, float] = field(default_factory=dict)
    GLOBAL_SUMS = ("norm",)  # summed over data-parallel ranks (distributed.globalize_plan)

    def micro_batches(self, size: int) -> list[list[int]]:
        return chunks(self.items, size)


def _nll(token_logprobs, policy, h: Tensor, ids: list[int], norm: float) -> Tensor:
    w, b = lm_head(policy)
    lp = token_logprobs(h, w, b, torch.tensor(ids, device=h.device))
    return -lp.to(loss_dtype(lp.dtype)).sum() / norm  # float32 (or wider) sum and normaliser


class SFT(Algorithm):
    """NLL of ``student_prompt(x) → reference ids + EOS``; needs no rollouts."""

    name = "sft"
    needs_rollouts = False

    def __init__(self, policy, prompts: PromptBuilder, sft: SFTConfig, loss: LossConfig):
        self.policy, self.prompts, self.sft_cfg = policy, prompts, sft
        self.token_logprobs = get_token_logprobs(loss.impl, loss.chunk_size)
        self.pad_id = prompts.pad_id

    def reference_ids(self, example) -> list[int]:
        ids = self.prompts.text_ids(example.reference)
        if self.sft_cfg.max_tokens and len(ids) >= self.sft_cfg.max_tokens:
            return ids[: self.sft_cfg.max_tokens]
        return ids + [self.prompts.eos_id]

    @torch.no_grad()
    def plan(self, batch: StepBatch, step: int) -> NLLPlan:
        targets = {gi: self.reference_ids(g.example) for gi, g in enumerate(batch.groups) if g.example.reference}
        items = sorted(targets)
        norm = float(sum(len(t) for t in targets.values()))
        n_trunc = sum(1 for t in targets.values() if t and t[-1] != self.prompts.eos_id)
        metrics = {
            "sft/references": float(len(items)),
            "sft/no_reference": float(len(batch.groups) - len(items)),
            "sft/ref_len_mean": norm / max(1, len(items)),
            "sft/truncated": n_trunc / max(1, len(items)),
        }
        return NLLPlan(batch, items, targets, norm, metrics)

    def loss(self, plan: NLLPlan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        seqs = [join_completion(plan.batch.groups[gi].student_prompt, plan.targets[gi]) for gi in micro]
        sb = SeqBatch([q for q, _ in seqs], [st for _, st in seqs], [len(plan.targets[gi]) for gi in micro])
        h = completion_hidden(self.policy, sb, self.pad_id)
        if not micro or plan.norm <= 0:
            return h.sum() * 0.0, {}
        nll = _nll(self.token_logprobs, self.policy, h, [t for gi in micro for t in plan.targets[gi]], plan.norm)
        return nll, {"sft_nll": float(nll.detach())}

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        return {"sft/nll": agg.get("sft_nll", 0.0)}


class RFT(Algorithm):
    """Rejection-sampling SFT: NLL on the step's correct rollouts only, token mean over the step."""

    name = "rft"

    def __init__(self, policy, prompts: PromptBuilder, loss: LossConfig):
        self.policy, self.prompts = policy, prompts
        self.token_logprobs = get_token_logprobs(loss.impl, loss.chunk_size)
        self.pad_id = prompts.pad_id

    @torch.no_grad()
    def plan(self, batch: StepBatch, step: int) -> NLLPlan:
        items = [i for i, r in enumerate(batch.rollouts) if r.correct and len(r.ids) > 0]
        norm = float(sum(len(batch.rollouts[i].ids) for i in items))
        no_correct = sum(1 for gi in range(len(batch.groups)) if not batch.pools(gi)[0])
        metrics = {
            "rft/rollouts": float(len(items)),
            "rft/tokens": norm,
            "rft/groups_without_correct": no_correct / max(1, len(batch.groups)),
            EMPTY_METRIC: float(batch.empty_rollouts()),
        }
        return NLLPlan(batch, items, {}, norm, metrics)

    def loss(self, plan: NLLPlan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        h, _ = student_hidden(self.policy, plan.batch, micro, self.pad_id)
        if not micro or plan.norm <= 0:
            return h.sum() * 0.0, {}
        nll = _nll(self.token_logprobs, self.policy, h, [t for i in micro for t in plan.batch.rollouts[i].ids], plan.norm)
        return nll, {"rft_nll": float(nll.detach())}

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        return {"rft/nll": agg.get("rft_nll", 0.0)}


def _no_teacher(cfg) -> bool:
    return False


@register_algorithm("sft", "SFT: NLL of the reference solutions (no rollouts)", needs_teacher=_no_teacher,
                    methods={"sft": ([], "SFT on the reference solutions", True)})
def build_sft(cfg, policy, teacher, prompts) -> SFT:
    return SFT(policy, prompts, cfg.sft, cfg.loss)


@register_algorithm("rft", "RFT: NLL of the model's own correct rollouts", needs_teacher=_no_teacher,
                    methods={"rft": ([], "rejection-sampling SFT on the model's own correct rollouts", True)})
def build_rft(cfg, policy, teacher, prompts) -> RFT:
    return RFT(policy, prompts, cfg.loss)
