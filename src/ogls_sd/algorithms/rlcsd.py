"""RLCSD (THU-BPM/RLCSD, arXiv 2606.11709): GRPO whose advantage is modulated token by token by a
contrast between the teacher given a correct sibling and the teacher given incorrect siblings.

Per prompt, the G rollouts get GRPO advantages (``grpo.*``, as :class:`~.grpo.GRPO`). In a group with
both outcomes, every rollout y_i that has a hint of each kind among its *siblings* (itself excluded)
gets one positive context (a random correct sibling) and up to ``rlcsd.num_negatives`` negative
contexts (random incorrect siblings), all built by the one context template
(:meth:`~ogls_sd.templates.PromptBuilder.context_ids`). The teacher weights score y_i after each
context (no grad, sampled tokens only); ``losses/rlcsd.py`` turns the scores into the contrast e_t,
the residual r_t, the gate and the modulated advantage, and the loss is RLCSD's two-path PPO loss.

Rollouts without such a pair (every rollout of an all-correct or all-incorrect group, the only
correct or the only incorrect rollout of a group) are dropped from the step, as in RLCSD's data path
(``_compute_rlcsd_teacher_inputs`` keeps ``valid_mask`` samples only). docs/algorithms/rlcsd.md maps
every field to RLCSD's code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import _Section, ConfigError, opt
from ..losses import rlcsd as mod
from ..modeling import SeqBatch, lm_head
from ..templates import join_completion
from .base import EMPTY_METRIC, StepBatch, StepPlan, chunks, loss_dtype, register_algorithm, student_hidden
from .grpo import GRPO, group_advantages, ppo_clip_loss


@dataclass
class RLCSDConfig(_Section):
    _section = "rlcsd"
    _positive = ("tau", "num_negatives", "max_context_tokens")
    _nonneg = ("scale", "delta", "eta")
    scale: float = opt(0.5, "Modulation scale (RLCSD's rlcsd_beta * rlcsd_lam = 1.0 * 0.5 in all their configs): r_t = clamp(scale * tanh(e_t / tau), clip_low, clip_high). The main knob; 0 = plain GRPO on the kept rollouts.")
    squash: str = opt("tanh", "Squash of the contrast: tanh(e_t / tau) (RLCSD), or none (r_t = scale * e_t before the clamp).", choices=mod.SQUASHES)
    tau: float = opt(0.02, "Squash temperature tau (RLCSD configs: rlcsd_tau = 0.02).")
    delta: float = opt(0.02, "Gate: the modulation applies to tokens with |r_t| > delta (rlcsd_delta); the others keep the GRPO advantage.")
    clip_low: float = opt(-2.0, "Lower clamp of r_t (rlcsd_residual_clip_low).")
    clip_high: float = opt(2.0, "Upper clamp of r_t (rlcsd_residual_clip_high).")
    sign_preserving: bool = opt(True, "Clamp A + r_t to the sign of A (0 where A = 0), so the verifier decides the direction (RLCSD). False = plain A + r_t.")
    eta: float = opt(1.0, "Weight of the modulated path: L = mean over unselected tokens + eta * mean over selected tokens (rlcsd_eta).")
    num_negatives: int = opt(4, "K: incorrect siblings per target in the negative branch (rlcsd_k_max; fewer when the group has fewer).")
    negative_branch: str = opt("log_mean", "How the K negative contexts are pooled: log of the mean probability (RLCSD) or mean of the log-probabilities (OGLS-SD's pooling; the ablation).", choices=mod.NEGATIVE_BRANCHES)
    max_context_tokens: int = opt(256, "A sibling used as a hint is truncated to this many tokens.")
    strip_think: bool = opt(True, "Strip <think>...</think> blocks from the siblings used as hints.")

    def validate(self) -> None:
        if self.clip_low > self.clip_high:
            raise ConfigError(f"rlcsd.clip_low: {self.clip_low} is above rlcsd.clip_high ({self.clip_high})")


@dataclass
class Hint:
    """The contexts of one target rollout: rollout indices of its positive and negative hints."""

    positive: int
    negatives: list[int]


@dataclass
class RLCSDPlan(StepPlan):
    GLOBAL_SUMS = ("n_selected", "n_unselected")  # summed over data-parallel ranks

    batch: StepBatch
    advantages: list[float]  # GRPO advantage per rollout of the step
    hints: dict[int, Hint]  # kept rollout -> its hints
    residual: dict[int, Tensor]  # kept rollout -> r_t [len]
    selected: dict[int, Tensor]  # kept rollout -> gate [len] (bool)
    n_selected: float  # selected tokens of the step (denominator of the modulated path)
    n_unselected: float
    old_logprobs: dict[int, Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def micro_batches(self, size: int) -> list[list[int]]:
        work = sorted(self.hints)
        return chunks(work, size)


class RLCSD(GRPO):
    """GRPO with RLCSD's contrastive token-level advantage modulation and two-path loss."""

    name = "rlcsd"

    def __init__(self, policy, teacher, prompts, rlcsd: RLCSDConfig, grpo, loss, temperature: float = 1.0,
                 plan_batch: int = 16, seed: int = 0):
        if teacher is None:
            raise ValueError("train.algorithm=rlcsd needs the teacher weights (they score the hinted contexts)")
        if grpo.kl_coef > 0:
            raise ValueError("grpo.kl_coef: RLCSD has no KL term (its configs set kl_loss_coef: 0); use 0 with train.algorithm=rlcsd")
        # grpo.reduction does not apply: RLCSD's loss is two token means (docs/algorithms/rlcsd.md)
        super().__init__(policy, teacher, prompts, grpo, loss, temperature=temperature, plan_batch=plan_batch)
        self.rlcsd = rlcsd
        self.seed = seed

    # ------------------------------------------------------------------ planning (no grad)
    @torch.no_grad()
    def plan(self, batch: StepBatch, step: int) -> RLCSDPlan:
        g = self.grpo_cfg
        adv = [0.0] * len(batch.rollouts)
        for grp in batch.groups:
            rs = [batch.rollouts[i].reward for i in grp.rollouts]
            for i, a in zip(grp.rollouts, group_advantages(rs, g.scale_std, g.std, g.eps)):
                adv[i] = a
        hints, counts = self.select_hints(batch, step)
        e = self.contrasts(batch, hints)
        residual, selected = {}, {}
        for i, e_i in e.items():
            residual[i] = mod.residual(e_i, self.rlcsd.scale, self.rlcsd.tau, self.rlcsd.squash, self.rlcsd.clip_low, self.rlcsd.clip_high)
            selected[i] = mod.gate(residual[i], self.rlcsd.delta)
        n_sel = float(sum(int(s.sum()) for s in selected.values()))
        n_all = float(sum(s.numel() for s in selected.values()))
        kept = sorted(hints)
        old = self._logprobs(batch, kept, teacher=False) if (self.inner_steps > 1 and kept) else None
        metrics = dict(counts)
        metrics.update(_contrast_metrics(e, residual, selected, hints))
        metrics[EMPTY_METRIC] = float(batch.empty_rollouts())
        return RLCSDPlan(batch, adv, hints, residual, selected, n_sel, n_all - n_sel, old, metrics)

    def select_hints(self, batch: StepBatch, step: int) -> tuple[dict[int, Hint], dict[str, float]]:
        """Per target rollout: one random correct sibling and up to K random incorrect siblings,
        the target itself never among them; a target without both is dropped (RLCSD's
        ``_hint_candidate_indices`` and its ``self_excluded_sampling_skip_count``). The draws are
        seeded per group by (train.seed, step, problem), so data-parallel ranks holding different
        groups draw what one process draws."""
        hints: dict[int, Hint] = {}
        n_correct = n_wrong = n_mixed = n_unpaired = 0
        for gi, grp in enumerate(batch.groups):
            P, N = batch.pools(gi, nonempty=True)
            n_correct += bool(P) and not N
            n_wrong += bool(N) and not P
            if not P or not N:
                continue
            n_mixed += 1
            rng = random.Random(f"{self.seed}/rlcsd/{step}/{grp.example.problem}")
            for i in P + N:
                pos = [j for j in P if j != i]
                neg = [k for k in N if k != i]
                if not pos or not neg:
                    n_unpaired += 1
                    continue
                hints[i] = Hint(rng.choice(pos), rng.sample(neg, min(self.rlcsd.num_negatives, len(neg))))
        G = max(1, len(batch.groups))
        counts = {"groups/all_correct": n_correct / G, "groups/all_incorrect": n_wrong / G, "groups/mixed": n_mixed / G,
                  "rlcsd/kept_rollouts": float(len(hints)), "rlcsd/unpaired_rollouts": float(n_unpaired)}
        return hints, counts

    def context(self, batch: StepBatch, j: int) -> list[int]:
        """The context prompt with sibling ``j`` as the hint: the same template for both branches."""
        ex = batch.groups[batch.rollouts[j].group].example
        return self.prompts.context_ids(ex, batch.rollouts[j].ids, self.rlcsd.max_context_tokens, self.rlcsd.strip_think)

    def contrasts(self, batch: StepBatch, hints: dict[int, Hint]) -> dict[int, Tensor]:
        """``e_t`` of every kept rollout (float32), from teacher passes of at most ``plan_batch``
        sequences each (context + target rollout; token ids only, no grad)."""
        ctx: dict[int, list[int]] = {}
        jobs: list[tuple[int, int]] = []  # (target, hint rollout); the first job of a target is its positive
        for i, h in sorted(hints.items()):
            for j in [h.positive] + h.negatives:
                if j not in ctx:
                    ctx[j] = self.context(batch, j)
                jobs.append((i, j))
        scores = self._teacher_scores(batch, [(ctx[j], i) for i, j in jobs])
        out: dict[int, Tensor] = {}
        c = 0
        for i, h in sorted(hints.items()):
            k = len(h.negatives)
            pos, neg = scores[c], torch.stack(scores[c + 1 : c + 1 + k])
            c += 1 + k
            out[i] = mod.contrast(pos, neg, torch.ones_like(neg, dtype=torch.bool), self.rlcsd.negative_branch)
        return out

    def _teacher_scores(self, batch: StepBatch, seqs: list[tuple[list[int], int]]) -> list[Tensor]:
        """Teacher log-probs (sampling temperature) of rollout ``i``'s tokens after ``prompt`` for each
        ``(prompt, i)``; one forward per ``plan_batch`` sequences."""
        w, b = self.teacher.head()
        out: list[Tensor] = []
        for s in range(0, len(seqs), self.plan_batch):
            chunk = seqs[s : s + self.plan_batch]
            ids_list = [batch.rollouts[i].ids for _, i in chunk]
            joined = [join_completion(p, ids) for (p, _), ids in zip(chunk, ids_list)]
            sb = SeqBatch([q for q, _ in joined], [st for _, st in joined], [len(x) for x in ids_list])
            h = self.teacher.hidden(sb, self.pad_id, self.plan_batch)
            ids = torch.tensor([t for x in ids_list for t in x], device=h.device)
            lp = self.token_logprobs(h, w, b, ids, self.temperature).float()
            off = 0
            for x in ids_list:
                out.append(lp[off : off + len(x)].clone())
                off += len(x)
        return out

    # ------------------------------------------------------------------ loss of one micro-batch
    def loss(self, plan: RLCSDPlan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        h_s, offsets = student_hidden(self.policy, plan.batch, micro, self.pad_id)
        return self.loss_on_hidden(plan, micro, h_s, offsets)

    def loss_on_hidden(self, plan: RLCSDPlan, micro: list[int], h_s: Tensor, offsets: list[int]) -> tuple[Tensor, dict[str, float]]:
        """Two-path PPO loss of the kept rollouts in ``micro``, normalised by the step's token counts."""
        sel_k = [k for k, i in enumerate(micro) if i in plan.hints]
        total = h_s.sum() * 0.0
        if not sel_k:
            return total, {}
        dev, batch = h_s.device, plan.batch
        rows = torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in sel_k]).to(dev)
        ids = torch.tensor([t for k in sel_k for t in batch.rollouts[micro[k]].ids], device=dev)
        w, b = lm_head(self.policy)
        lp = self.token_logprobs(h_s[rows], w, b, ids, self.temperature)
        kept = [micro[k] for k in sel_k]
        adv = torch.cat([torch.full((len(batch.rollouts[i].ids),), plan.advantages[i]) for i in kept]).to(dev, lp.dtype)
        r = torch.cat([plan.residual[i] for i in kept]).to(dev, lp.dtype)
        sel = torch.cat([plan.selected[i] for i in kept]).to(dev)
        a_tok = mod.modulated_advantage(adv, r, sel, self.rlcsd.sign_preserving)
        old = torch.cat([plan.old_logprobs[i] for i in kept]).to(dev, lp.dtype) if plan.old_logprobs is not None else lp.detach()
        pg, clipped, ratio = ppo_clip_loss(lp, old, a_tok, self.eps_lo, self.eps_hi)
        wdtype = loss_dtype(lp.dtype)
        wts = mod.two_path_weights(sel, plan.n_selected, plan.n_unselected, self.rlcsd.eta, wdtype)
        per = pg.to(wdtype) * wts
        total = total + per.sum()
        return total, {
            "grpo_pg_loss": float(per.detach().sum()),
            "rlcsd_selected_loss": float(per.detach()[sel].sum()),
            "grpo_tokens": float(lp.numel()),
            "grpo_clipped_sum": float(clipped.sum()),
            "grpo_ratio_sum": float(ratio.detach().sum()),
        }

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        out = super().step_metrics(agg)
        out["rlcsd/selected_loss"] = agg.get("rlcsd_selected_loss", 0.0)
        return out


def _contrast_metrics(e: dict[int, Tensor], residual: dict[int, Tensor], selected: dict[int, Tensor],
                      hints: dict[int, Hint]) -> dict[str, float]:
    """Token means of e_t, |e_t| and |r_t| (selected tokens), the selected share and the mean K."""
    if not e:
        return {"rlcsd/selected_frac": 0.0, "rlcsd/e_mean": 0.0, "rlcsd/e_abs_mean": 0.0,
                "rlcsd/residual_abs_mean": 0.0, "rlcsd/negatives_mean": 0.0}
    e_all = torch.cat(list(e.values())).double()
    r_all = torch.cat([residual[i] for i in e]).double()
    s_all = torch.cat([selected[i] for i in e])
    n_sel = int(s_all.sum())
    return {
        "rlcsd/selected_frac": n_sel / max(1, s_all.numel()),
        "rlcsd/e_mean": float(e_all.mean()),
        "rlcsd/e_abs_mean": float(e_all.abs().mean()),
        "rlcsd/residual_abs_mean": float(r_all[s_all].abs().mean()) if n_sel else 0.0,
        "rlcsd/negatives_mean": sum(len(h.negatives) for h in hints.values()) / len(hints),
    }


@register_algorithm(
    "rlcsd", "RLCSD (THU-BPM): GRPO advantage modulated per token by the teacher's correct-vs-incorrect sibling contrast",
    config_section=RLCSDConfig,
    needs_teacher=lambda cfg: True,
    needs_siblings=True,
    default_teacher="live",
    noop_hint="RLCSD learns only from rollouts that have a correct and an incorrect sibling: raise "
              "rollout.num_generations (>= 4) or use prompts the model solves sometimes",
    methods={
        "rlcsd": ([], "RLCSD with its published defaults (scale 0.5, tau 0.02, delta 0.02, K 4, log of the mean probability)"),
        "rlcsd_meanlog": (["rlcsd.negative_branch=mean_log"],
                          "RLCSD with OGLS-SD's negative branch (mean of log-probabilities): the contrast in the advantage"),
    },
)
def build_rlcsd(cfg, policy, teacher, prompts) -> RLCSD:
    """``train.algorithm=rlcsd`` from a loaded config."""
    return RLCSD(policy, teacher, prompts, cfg.rlcsd, cfg.grpo, cfg.loss, temperature=cfg.rollout.temperature,
                 plan_batch=cfg.train.micro_batch_size, seed=cfg.train.seed)
