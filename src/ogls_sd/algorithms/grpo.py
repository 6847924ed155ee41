"""GRPO (RLVR baseline, method.md §4): group-normalised advantages and a token-level PPO-clipped
policy-gradient loss.

Per prompt, the G rollouts' verified rewards give

    A_i = (r_i − mean r) / (std r + ε)        (grpo.scale_std = true; std: grpo.std)
    A_i =  r_i − mean r                       (grpo.scale_std = false: Dr. GRPO)

and every completion token t of rollout i gets the loss

    ℓ_{i,t} = −min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1 − ε_lo, 1 + ε_hi) A_i),
    ρ_{i,t} = exp(log π_θ(y_t | x, y_<t) − log π_old(y_t | x, y_<t))

(ε_lo = ``grpo.clip_eps``, ε_hi = ``grpo.clip_eps_high`` or ε_lo), optionally plus
``grpo.kl_coef · k3`` with ``k3 = exp(q − p) − (q − p) − 1``, ``p = log π_θ(y_t)``,
``q = log π_ref(y_t)`` (the teacher weights on the *student* prompt; the frozen teacher is the
initial policy, i.e. the usual reference model). Reduction: token mean over all completion tokens of
the step (``token_mean``), or per-sequence mean then mean over the step's rollouts
(``sequence_mean``). Log-probs use the sampling temperature (``rollout.temperature``), as the
rollouts were drawn from ``softmax(z / T)``.

``π_old`` is the policy that sampled the rollouts, before the step's first update. With
``inner_steps = 1`` it equals the policy being differentiated, so the old log-probs are the detached
current ones (ratio exactly 1, no extra forward pass); with ``inner_steps > 1`` ``plan`` computes
them under ``no_grad`` before any update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import GRPOConfig, LossConfig
from ..losses import get_token_logprobs
from ..modeling import SeqBatch, lm_head
from ..teacher import Teacher
from ..templates import PromptBuilder, join_completion
from .base import Algorithm, EMPTY_METRIC, StepBatch, StepPlan, length_chunks, loss_dtype, register_algorithm, student_hidden


def group_advantages(rewards: list[float], scale_std: bool = True, std: str = "sample", eps: float = 1e-4) -> list[float]:
    """``A_i = (r_i − mean r) / (std r + eps)`` (or ``r_i − mean r`` without std scaling).

    ``std="sample"`` uses the ``n − 1`` denominator (``torch.std``'s default, as TRL and verl do),
    ``"population"`` the ``n`` denominator. A group whose rewards have zero spread (including a
    group of one rollout) gets all-zero advantages.
    """
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    centred = [r - mean for r in rewards]
    if max(rewards) == min(rewards):
        return [0.0] * n
    if not scale_std:
        return centred
    ss = sum(c * c for c in centred)
    var = ss / (n - 1) if std == "sample" else ss / n
    sd = math.sqrt(var)
    return [c / (sd + eps) for c in centred]


@dataclass
class GRPOPlan(StepPlan):
    GLOBAL_SUMS = ("norm",)  # summed over data-parallel ranks (distributed.globalize_plan)

    batch: StepBatch
    advantages: list[float]  # per rollout of the step
    work: list[int]  # rollouts that need a student pass (non-zero advantage, or all with a KL term)
    norm: float  # token_mean: completion tokens of the step; sequence_mean: rollouts of the step
    old_logprobs: dict[int, Tensor] | None = None  # inner_steps > 1: log π_old per rollout [len]
    ref_logprobs: dict[int, Tensor] | None = None  # kl_coef > 0: log π_ref per rollout [len]
    metrics: dict[str, float] = field(default_factory=dict)

    def micro_batches(self, size: int) -> list[list[int]]:
        return length_chunks(self.work, size, lambda i: len(self.batch.rollouts[i].ids))


class GRPO(Algorithm):
    """GRPO with PPO ratio clipping, optional inner steps and optional k3 KL to the teacher weights."""

    name = "grpo"

    def __init__(self, policy, teacher: Teacher | None, prompts: PromptBuilder, grpo: GRPOConfig, loss: LossConfig,
                 temperature: float = 1.0, plan_batch: int = 16):
        self.policy, self.teacher, self.prompts = policy, teacher, prompts
        self.grpo_cfg = grpo
        self.temperature = temperature
        self.token_logprobs = get_token_logprobs(loss.impl, loss.chunk_size)
        self.pad_id = prompts.pad_id
        self.inner_steps = grpo.inner_steps
        self.plan_batch = max(1, plan_batch)
        self.eps_lo = grpo.clip_eps
        self.eps_hi = grpo.clip_eps_high if grpo.clip_eps_high > 0 else grpo.clip_eps
        if grpo.kl_coef > 0 and teacher is None:
            raise ValueError("grpo.kl_coef > 0 needs the teacher weights (the KL reference)")

    # ------------------------------------------------------------------ planning (no grad)
    @torch.no_grad()
    def plan(self, batch: StepBatch, step: int) -> GRPOPlan:
        g = self.grpo_cfg
        adv = [0.0] * len(batch.rollouts)
        zero_spread = 0
        for grp in batch.groups:
            rs = [batch.rollouts[i].reward for i in grp.rollouts]
            if not rs or max(rs) == min(rs):
                zero_spread += 1
            for i, a in zip(grp.rollouts, group_advantages(rs, g.scale_std, g.std, g.eps)):
                adv[i] = a
        valid = [i for i, r in enumerate(batch.rollouts) if len(r.ids) > 0]
        work = valid if g.kl_coef > 0 else [i for i in valid if adv[i] != 0.0]
        if g.reduction == "token_mean":
            norm = float(sum(len(batch.rollouts[i].ids) for i in valid))
        else:
            norm = float(len(valid))
        old = self._logprobs(batch, work, teacher=False) if (self.inner_steps > 1 and work) else None
        ref = self._logprobs(batch, work, teacher=True) if (g.kl_coef > 0 and work) else None
        n = max(1, len(adv))
        mean_a = sum(adv) / n
        metrics = {
            "grpo/zero_spread_frac": zero_spread / max(1, len(batch.groups)),
            "grpo/adv_mean": mean_a,
            "grpo/adv_std": math.sqrt(sum((a - mean_a) ** 2 for a in adv) / n),
            "grpo/adv_abs_mean": sum(abs(a) for a in adv) / n,
            "grpo/adv_max": max(adv, default=0.0),
            "grpo/adv_min": min(adv, default=0.0),
            "grpo/active_rollouts": float(sum(1 for i in valid if adv[i] != 0.0)),
            EMPTY_METRIC: float(len(batch.rollouts) - len(valid)),
        }
        return GRPOPlan(batch, adv, work, norm, old, ref, metrics)

    def _logprobs(self, batch: StepBatch, idx: list[int], teacher: bool) -> dict[int, Tensor]:
        """Sampled-token log-probs (at the sampling temperature) of rollouts ``idx`` under the
        policy as it is now, or under the teacher weights on the student prompt; ``plan_batch``
        rollouts per forward pass."""
        out: dict[int, Tensor] = {}
        if teacher:
            w, b = self.teacher.head()
        else:
            w, b = lm_head(self.policy)
        for s in range(0, len(idx), self.plan_batch):
            chunk = idx[s : s + self.plan_batch]
            if teacher:
                ro = [batch.rollouts[i] for i in chunk]
                joined = [join_completion(batch.groups[r.group].student_prompt, r.ids) for r in ro]
                sb = SeqBatch([q for q, _ in joined], [st for _, st in joined], [len(r.ids) for r in ro])
                h = self.teacher.hidden(sb, self.pad_id, self.plan_batch)
                offsets = [0]
                for r in ro:
                    offsets.append(offsets[-1] + len(r.ids))
            else:
                h, offsets = student_hidden(self.policy, batch, chunk, self.pad_id)
            ids = torch.tensor([t for i in chunk for t in batch.rollouts[i].ids], device=h.device)
            lp = self.token_logprobs(h, w, b, ids, self.temperature).float()
            for k, i in enumerate(chunk):
                out[i] = lp[offsets[k] : offsets[k + 1]].clone()
        return out

    # ------------------------------------------------------------------ loss of one micro-batch
    def loss(self, plan: GRPOPlan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        h_s, offsets = student_hidden(self.policy, plan.batch, micro, self.pad_id)
        return self.loss_on_hidden(plan, micro, h_s, offsets)

    def loss_on_hidden(self, plan: GRPOPlan, micro: list[int], h_s: Tensor, offsets: list[int]) -> tuple[Tensor, dict[str, float]]:
        """:meth:`loss` given the student's hidden states of ``micro`` (shared with hybrids)."""
        batch = plan.batch
        work = set(plan.work)
        sel = [k for k, i in enumerate(micro) if i in work]
        total = h_s.sum() * 0.0
        if not sel or plan.norm <= 0:
            return total, {}
        dev = h_s.device
        rows = torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in sel]).to(dev)
        ids = torch.tensor([t for k in sel for t in batch.rollouts[micro[k]].ids], device=dev)
        w, b = lm_head(self.policy)
        lp = self.token_logprobs(h_s[rows], w, b, ids, self.temperature)
        lens = [offsets[k + 1] - offsets[k] for k in sel]
        adv = torch.cat([torch.full((n,), plan.advantages[micro[k]]) for k, n in zip(sel, lens)]).to(dev, lp.dtype)
        # token weights and the weighted sum in float32 (or wider): a step's weights sum to 1
        wdtype = loss_dtype(lp.dtype)
        if self.grpo_cfg.reduction == "token_mean":
            wts = torch.full(lp.shape, 1.0 / plan.norm, dtype=wdtype, device=dev)
        else:
            wts = torch.cat([torch.full((n,), 1.0 / (n * plan.norm), dtype=torch.float64) for n in lens]).to(dev, wdtype)
        if plan.old_logprobs is not None:
            old = torch.cat([plan.old_logprobs[micro[k]] for k in sel]).to(dev, lp.dtype)
        else:
            old = lp.detach()
        pg, clipped, ratio = ppo_clip_loss(lp, old, adv, self.eps_lo, self.eps_hi)
        per_tok = pg
        m: dict[str, float] = {}
        if plan.ref_logprobs is not None:
            ref = torch.cat([plan.ref_logprobs[micro[k]] for k in sel]).to(dev, lp.dtype)
            k3 = k3_kl(lp, ref)
            per_tok = per_tok + self.grpo_cfg.kl_coef * k3
            m["grpo_kl_sum"] = float(k3.detach().sum())
        total = total + (per_tok.to(wdtype) * wts).sum()
        m.update({
            "grpo_pg_loss": float((pg.detach().to(wdtype) * wts).sum()),
            "grpo_tokens": float(lp.numel()),
            "grpo_clipped_sum": float(clipped.sum()),
            "grpo_ratio_sum": float(ratio.detach().sum()),
        })
        return total, m

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        n = agg.get("grpo_tokens", 0.0)
        out = {
            "grpo/pg_loss": agg.get("grpo_pg_loss", 0.0),
            "grpo/clip_frac": agg.get("grpo_clipped_sum", 0.0) / n if n else 0.0,
            "grpo/ratio_mean": agg.get("grpo_ratio_sum", 0.0) / n if n else 1.0,
        }
        if self.grpo_cfg.kl_coef > 0:
            out["grpo/kl_token"] = agg.get("grpo_kl_sum", 0.0) / n if n else 0.0
        return out


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_lo: float, eps_hi: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``−min(ρ A, clip(ρ, 1 − eps_lo, 1 + eps_hi) A)`` with ``ρ = exp(logp − old_logp)``.

    Returns ``(loss [N], clipped [N] bool, ratio [N])``; ``clipped`` marks the tokens where the
    clipped branch is the minimum and strictly smaller (their gradient is zero): ratio above
    ``1 + eps_hi`` with ``A > 0``, or below ``1 − eps_lo`` with ``A < 0``.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped_val = torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * adv
    loss = -torch.minimum(unclipped, clipped_val)
    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > 1.0 + eps_hi)) | ((adv < 0) & (ratio < 1.0 - eps_lo))
    return loss, clipped, ratio


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of ``KL(π_θ ‖ π_ref)`` per sampled token: ``e^{q−p} − (q − p) − 1``."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def build_grpo(cfg, policy, teacher: Teacher, prompts: PromptBuilder) -> GRPO:
    return GRPO(policy, teacher, prompts, cfg.grpo, cfg.loss, temperature=cfg.rollout.temperature,
                plan_batch=cfg.train.micro_batch_size)


register_algorithm(
    "grpo", "GRPO (RLVR): group-normalised advantages, PPO-clipped token-level policy gradient",
    needs_teacher=lambda cfg: cfg.grpo.kl_coef > 0, needs_siblings=True, default_teacher="frozen",
    methods={"grpo": ([], "GRPO (RLVR)", True)},
)(build_grpo)
