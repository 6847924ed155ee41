"""Naive OPSD + RLVR (method.md §4): ``L = L_GRPO + α · L_OPSD`` (α = ``hybrid.alpha``).

A composition, not a copy: the GRPO module (``grpo.py``) and the OPSD configuration of the OGLS-SD
class (``opsd.py``) each plan the step on the same rollouts; every micro-batch runs ONE student pass
whose hidden states both losses use (``loss_on_hidden``). Each term keeps its own global normaliser
(GRPO: ``grpo.reduction`` over all completion tokens; OPSD: ``loss.reduction`` over the distilled
tokens), so the summed micro-batch losses are exactly ``L_GRPO + α · L_OPSD`` of the step.
``grpo.inner_steps > 1`` repeats both terms on the same rollouts (the OPSD teacher target is
recomputed each time, from the same teacher weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .base import Algorithm, StepBatch, StepPlan, chunks, register_algorithm, student_hidden
from .grpo import GRPO, GRPOPlan, build_grpo
from .ogls_sd import DISTILL_NOOP_HINT, OGLSSD, Plan, build_ogls
from .opsd import opsd_steering


@dataclass
class HybridPlan(StepPlan):
    batch: StepBatch
    grpo: GRPOPlan
    opsd: Plan
    metrics: dict[str, float] = field(default_factory=dict)

    def subplans(self):
        """Plans whose normalisers are summed over data-parallel ranks."""
        return (self.grpo, self.opsd)

    def micro_batches(self, size: int) -> list[list[int]]:
        work = sorted(set(self.grpo.work) | set(self.opsd.targets) | set(self.opsd.tail))
        return chunks(work, size)


class OPSDGRPO(Algorithm):
    name = "opsd_grpo"

    def __init__(self, grpo: GRPO, opsd: OGLSSD, alpha: float = 1.0):
        self.grpo, self.opsd, self.alpha = grpo, opsd, alpha
        self.policy, self.pad_id = opsd.policy, opsd.pad_id
        self.inner_steps = grpo.inner_steps

    def plan(self, batch: StepBatch, step: int) -> HybridPlan:
        pg = self.grpo.plan(batch, step)
        po = self.opsd.plan(batch, step)
        return HybridPlan(batch, pg, po, {**po.metrics, **pg.metrics})

    def loss(self, plan: HybridPlan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        h_s, offsets = student_hidden(self.policy, plan.batch, micro, self.pad_id)
        lg, mg = self.grpo.loss_on_hidden(plan.grpo, micro, h_s, offsets)
        lo, mo = self.opsd.loss_on_hidden(plan.opsd, micro, h_s, offsets)
        m = {**mo, **mg, "hybrid_grpo_loss": float(lg.detach()), "hybrid_opsd_loss": float(lo.detach())}
        return lg + self.alpha * lo, m

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        return {
            **self.grpo.step_metrics(agg),
            **self.opsd.step_metrics(agg),
            "hybrid/grpo_loss": agg.get("hybrid_grpo_loss", 0.0),
            "hybrid/opsd_loss": agg.get("hybrid_opsd_loss", 0.0),
            "hybrid/alpha": self.alpha,
        }


@register_algorithm(
    "opsd_grpo", "naive OPSD + RLVR: L_GRPO + hybrid.alpha * L_OPSD", needs_siblings=True, default_teacher="frozen",
    noop_hint=DISTILL_NOOP_HINT, methods={"opsd_grpo": ([], "naive OPSD + RLVR: L_GRPO + alpha * L_OPSD")},
)
def build_opsd_grpo(cfg, policy, teacher, prompts) -> OPSDGRPO:
    opsd = build_ogls(cfg, policy, teacher, prompts, opsd_steering(cfg.steering))
    opsd.name = "opsd"
    return OPSDGRPO(build_grpo(cfg, policy, teacher, prompts), opsd, cfg.hybrid.alpha)
