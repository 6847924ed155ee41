"""OGLS-SD: on-policy self-distillation with outcome-guided logit steering (method.md §3).

One step, as the trainer drives it::

    plan = algo.plan(batch)                 # pools, gating, contexts, global directions (no grad)
    for micro in plan.micro_batches(m):     # gradient accumulation
        loss, metrics = algo.loss(plan, micro); loss.backward()

Per prompt: pools P (correct) and N (incorrect) from the verified rollouts; for every target
rollout y_i (the incorrect ones by default) the steered teacher

    z̃_t = z0_t + λ · d_t,   d_t = mean_{j∈P'} log p_φ(·|ctx(x, y_j), y_i,<t) − mean_{k∈N'} (same)

is distilled into the student with the (clipped) divergence of ``loss``; short correct rollouts
add the positive-tail SFT term μ · NLL(last ``tail_tokens`` tokens). A target whose distillation
term cannot move the student is not planned at all (no teacher pass, no student pass for it): λ = 0
with the live anchor on the student's own prompt makes the target the student itself, detached
(:meth:`OGLSSD.zero_gradient`). OPSD is the configuration
``pooling=global, λ=0, anchor=privileged, distill_on=all, tail_weight=0`` (see ``opsd.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import LossConfig, SteeringConfig
from ..losses import DivergenceSpec, TeacherTarget, mean_log_softmax
from ..losses import get_distill_loss, get_token_logprobs
from ..modeling import SeqBatch, lm_head, row_offsets
from ..templates import PromptBuilder, join_completion
from ..teacher import Teacher
from .base import (EMPTY_METRIC, Algorithm, StepBatch, StepPlan, chunks, distill_step_metrics, loss_dtype,
                   register_algorithm,
                   student_hidden)


@dataclass
class TargetPlan:
    """How rollout ``i`` is distilled. ``pos``/``neg`` are context prompt ids (attempt spliced in)."""

    rollout: int
    anchor_prompt: list[int] | None  # None -> z0 = 0
    pos: list[list[int]] = field(default_factory=list)
    neg: list[list[int]] = field(default_factory=list)
    strength: float = 1.0
    direction: int = -1  # index into plan.directions (global pooling), -1 for none


@dataclass
class Plan(StepPlan):
    """Normalisers in ``GLOBAL_SUMS`` are summed over data-parallel ranks before the loss."""

    GLOBAL_SUMS = ("distill_norm", "tail_norm", "n_seq_targets")
    batch: StepBatch
    targets: dict[int, TargetPlan]  # rollout index -> plan
    tail: list[int]  # rollouts contributing the positive-tail SFT term
    directions: Tensor | None  # [D, V] global pooling
    distill_norm: float  # denominators of the global token means
    tail_norm: float
    n_seq_targets: int
    metrics: dict[str, float]

    def micro_batches(self, size: int) -> list[list[int]]:
        work = sorted(set(self.targets) | set(self.tail))
        return chunks(work, size)  # in index order: a group's targets share their context prefixes


class OGLSSD(Algorithm):
    """The OGLS-SD algorithm (also serves OPSD and SDPO-style configurations)."""

    name = "ogls_sd"

    def __init__(self, policy, teacher: Teacher, prompts: PromptBuilder, steering: SteeringConfig,
                 loss: LossConfig, max_new_tokens: int, seed: int = 0, teacher_batch: int = 16):
        self.policy, self.teacher, self.prompts = policy, teacher, prompts
        self.steering, self.loss_cfg = steering, loss
        self.max_new_tokens = max_new_tokens
        self.spec = DivergenceSpec(loss.divergence, loss.beta, loss.top_k, loss.clip, loss.clip_tau, loss.temperature)
        self.distill = get_distill_loss(loss.impl, loss.chunk_size)
        self.token_logprobs = get_token_logprobs(loss.impl, loss.chunk_size)
        self.seed = seed
        self.pad_id = prompts.pad_id
        # sequences per no-grad teacher forward (train.micro_batch_size): a micro-batch of 4 targets
        # with 4 + 4 contexts is 36 sequences, each prompt + context + completion long
        self.teacher_batch = max(1, teacher_batch)
        self.prefix_tokens = steering.prefix_cache_max_tokens  # 0: no key/value sharing of prefixes
        # λ = 0 targets are skipped only when the live teacher's (eval-mode) pass is the student's own
        # forward: a dropout in the student would make them differ (tests switch it off to compare)
        self.skip_zero_gradient = getattr(teacher, "kind", None) == "live" and not _has_dropout(policy)
        # the live teacher's pass on the student prompt is the student's own forward (no dropout):
        # its anchor rows are the student pass's, detached (part of the sharing, off with it)
        self.anchor_from_student = self.skip_zero_gradient and self.prefix_tokens > 0

    def zero_gradient(self, strength: float, anchor_is_student_prompt: bool) -> bool:
        """Whether a target's distillation term has an exactly zero gradient, so that planning it
        would only spend teacher passes: λ = 0 and z0 = the live policy on the student prompt, i.e.
        p̃ = p_θ(·|x, y_<t) detached, the student's own distribution (every divergence of ``loss``,
        clipped or not, at any temperature, has zero gradient there)."""
        return self.skip_zero_gradient and strength == 0.0 and anchor_is_student_prompt

    # ------------------------------------------------------------------ planning (no grad)
    def _ctx(self, g, attempt_ids: list[int]) -> list[int]:
        return self.prompts.context_ids(g.example, attempt_ids, self.steering.max_context_tokens, self.steering.strip_think)

    def _n_distill(self, i: int, batch: StepBatch) -> int:
        return min(len(batch.rollouts[i].ids), self.loss_cfg.max_distill_tokens)

    @torch.no_grad()
    def plan(self, batch: StepBatch, step: int) -> Plan:
        s = self.steering
        rng = random.Random(f"{self.seed}/{step}")
        targets: dict[int, TargetPlan] = {}
        tail: list[int] = []
        directions: list[Tensor] = []
        n_all_correct = n_all_wrong = n_mixed = 0
        fired = {"skip": 0, "reference": 0, "opsd": 0}
        n_zero_grad = 0
        for gi, g in enumerate(batch.groups):
            P, N = batch.pools(gi)
            if not N:
                n_all_correct += 1
            elif not P:
                n_all_wrong += 1
            else:
                n_mixed += 1
            # Empty rollouts (no token) are neither distilled nor used as contexts or pooled: a
            # group whose correct rollouts are all empty has no positive (the no_positive rule).
            P, N = batch.pools(gi, nonempty=True)
            # positive-tail SFT on short correct rollouts (ended with EOS before the limit)
            if s.tail_weight > 0:
                tail += [i for i in P if batch.rollouts[i].finished]
            cand = N if s.distill_on == "incorrect" else [i for i in g.rollouts if batch.rollouts[i].ids]
            if not cand:
                continue
            anchor = {"unprivileged": g.student_prompt, "privileged": g.teacher_prompt, "none": None}[s.anchor]
            strength, fallback_opsd = s.strength, False
            pos_attempts: list[list[int]] = [batch.rollouts[j].ids for j in P]
            if not P:
                fired[s.no_positive] += 1
                if s.no_positive == "skip":
                    continue
                if s.no_positive == "reference":
                    ref = g.example.reference
                    if s.fallback_reference == "plain":  # the task's student-style reference (method.md §7)
                        ref = getattr(g.example, "plain_reference", "") or ref
                    pos_attempts = [self.prompts.text_ids(ref)]
                else:  # opsd: the privileged teacher is the target
                    anchor, strength, fallback_opsd = g.teacher_prompt, 0.0, True
            if self.zero_gradient(strength, s.anchor == "unprivileged" and not fallback_opsd):
                n_zero_grad += len(cand)  # the student's own distribution: nothing to distil
                continue
            if s.pooling == "context":
                pos_sel = _subset(pos_attempts, s.max_contexts, rng)
                pos_ctx = [] if fallback_opsd else [self._ctx(g, a) for a in pos_sel]
                for i in cand:
                    neg_pool = [k for k in N if k != i]
                    neg_sel = _subset(neg_pool, s.max_contexts, rng) if s.negative_pool else []
                    targets[i] = TargetPlan(
                        i, anchor, pos=pos_ctx,
                        neg=[] if fallback_opsd else [self._ctx(g, batch.rollouts[k].ids) for k in neg_sel],
                        strength=strength,
                    )
            else:  # global pooling: one vocabulary vector per group
                d_idx = -1
                if strength != 0.0 and not fallback_opsd:
                    d = self._global_direction(g, batch, P, N, pos_attempts)
                    directions.append(d)
                    d_idx = len(directions) - 1
                for i in cand:
                    targets[i] = TargetPlan(i, anchor, strength=strength, direction=d_idx)

        distill_norm = float(sum(self._n_distill(i, batch) for i in targets))
        tail_norm = float(sum(min(len(batch.rollouts[i].ids), s.tail_tokens) for i in tail))
        G = max(1, len(batch.groups))
        metrics = {
            "groups/all_correct": n_all_correct / G,
            "groups/all_incorrect": n_all_wrong / G,
            "groups/mixed": n_mixed / G,
            "no_positive/skip": float(fired["skip"]),
            "no_positive/reference": float(fired["reference"]),
            "no_positive/opsd": float(fired["opsd"]),
            "targets": float(len(targets)),
            "targets_zero_grad": float(n_zero_grad),
            EMPTY_METRIC: float(batch.empty_rollouts()),
            "tail_rollouts": float(len(tail)),
            "pool/pos_mean": sum(len(t.pos) for t in targets.values()) / max(1, len(targets)),
            "pool/neg_mean": sum(len(t.neg) for t in targets.values()) / max(1, len(targets)),
        }
        dirs = torch.stack(directions) if directions else None
        return Plan(batch, targets, tail, dirs, distill_norm, tail_norm, len(targets), metrics)

    def _global_direction(self, g, batch: StepBatch, P: list[int], N: list[int], pos_attempts) -> Tensor:
        """``mean_{i∈P,t} log p_φ(·|teacher_prompt, y_i,<t) − mean_{i∈N,t} (same)`` → ``[V]``.

        The mean runs jointly over all tokens of a pool [choice]. With no negatives d = zpos − zpos = 0.
        """
        w, b = self.teacher.head()

        def pooled(attempts: list[list[int]]) -> Tensor:
            seqs = [join_completion(g.teacher_prompt, a) for a in attempts]
            sb = SeqBatch([q for q, _ in seqs], [st for _, st in seqs], [len(a) for a in attempts])
            h = self.teacher.hidden(sb, self.pad_id, self.teacher_batch, self.prefix_tokens)
            return mean_log_softmax(h, w, b, self.loss_cfg.chunk_size)

        # A pool without a single token (its attempts all empty, e.g. an empty reference) has no
        # mean: no direction for the group (d = 0), like a group without negatives.
        pos_attempts = [a for a in pos_attempts if a]
        neg_attempts = [batch.rollouts[k].ids for k in N if batch.rollouts[k].ids]
        if not pos_attempts or not neg_attempts:
            return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return pooled(pos_attempts) - pooled(neg_attempts)

    # ------------------------------------------------------------------ loss of one micro-batch
    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        return distill_step_metrics(agg)

    def loss(self, plan: Plan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        """Loss terms of the rollouts ``micro``, normalised by the whole step's token counts.

        Summing ``loss`` over all micro-batches of a step gives the step's objective.
        """
        # Student: one pass over full completions; rows are selected in ``loss_on_hidden``.
        h_s, offsets = student_hidden(self.policy, plan.batch, micro, self.pad_id)
        return self.loss_on_hidden(plan, micro, h_s, offsets)

    def loss_on_hidden(self, plan: Plan, micro: list[int], h_s: Tensor, offsets: list[int]) -> tuple[Tensor, dict[str, float]]:
        """:meth:`loss` given the student's hidden states of ``micro`` (see
        :func:`~ogls_sd.algorithms.base.student_hidden`); hybrids share one student pass this way."""
        batch = plan.batch
        w_s, b_s = lm_head(self.policy)
        total = h_s.sum() * 0.0
        m: dict[str, float] = {}
        # --- distillation rows -------------------------------------------------------------
        tgt_ids = [i for i in micro if i in plan.targets]
        if tgt_ids and plan.distill_norm > 0:
            rows, ids, weights = [], [], []
            wdtype = loss_dtype(h_s.dtype)  # weights of a step sum to 1, also with bf16 hidden states
            for i in tgt_ids:
                k = micro.index(i)
                n = self._n_distill(i, batch)
                rows.append(torch.arange(offsets[k], offsets[k] + n))
                ids += batch.rollouts[i].ids[:n]
                if self.loss_cfg.reduction == "token_mean":
                    weights += [1.0 / plan.distill_norm] * n
                else:
                    weights += [1.0 / (n * plan.n_seq_targets)] * n
            rows_t = torch.cat(rows).to(h_s.device)
            own = h_s[rows_t].detach() if self.anchor_from_student else None
            target = self._teacher_target([plan.targets[i] for i in tgt_ids], batch, plan, own)
            out = self.distill(
                h_s[rows_t], w_s, b_s, target, self.spec,
                torch.tensor(weights, dtype=wdtype, device=h_s.device),
                torch.tensor(ids, device=h_s.device),
            )
            total = total + out.loss
            st = out.stats
            m.update({
                "distill_loss": float(out.loss.detach()),
                "kl_sum": float(st["kl"].sum()), "teacher_entropy_sum": float(st["teacher_entropy"].sum()),
                "student_entropy_sum": float(st["student_entropy"].sum()), "steer_rms_sum": float(st["steer_rms"].sum()),
                "clipped_sum": float(st["clipped"].sum()), "clip_den_sum": float(st["vocab"].sum()),
                "distill_rows": float(len(ids)),
            })
        # --- positive-tail SFT ---------------------------------------------------------------
        tail_ids = [i for i in micro if i in set(plan.tail)]
        if tail_ids and plan.tail_norm > 0:
            rows, ids = [], []
            for i in tail_ids:
                k = micro.index(i)
                L = len(batch.rollouts[i].ids)
                n = min(L, self.steering.tail_tokens)
                rows.append(torch.arange(offsets[k] + L - n, offsets[k] + L))
                ids += batch.rollouts[i].ids[L - n :]
            rows_t = torch.cat(rows).to(h_s.device)
            lp = self.token_logprobs(h_s[rows_t], w_s, b_s, torch.tensor(ids, device=h_s.device))
            nll = -lp.to(loss_dtype(lp.dtype)).sum() / plan.tail_norm
            total = total + self.steering.tail_weight * nll
            m["tail_nll"] = float(nll.detach())
        return total, m

    @torch.no_grad()
    def _teacher_target(self, tps: list[TargetPlan], batch: StepBatch, plan: Plan,
                        student_rows: Tensor | None = None) -> TeacherTarget:
        """Teacher hidden states for the distilled rows of ``tps`` (in that order). ``student_rows``:
        the student's (detached) hidden states of those rows, the anchor of every target anchored on
        its own student prompt when the teacher is the live policy (:attr:`anchor_from_student`)."""
        w, b = self.teacher.head()
        lens = [self._n_distill(tp.rollout, batch) for tp in tps]
        n_rows = sum(lens)
        H = w.shape[1]
        dev = w.device

        def run(prompts: list[list[int]], tpi: list[int]) -> Tensor:
            seqs = [join_completion(p, batch.rollouts[tps[t].rollout].ids) for p, t in zip(prompts, tpi)]
            sb = SeqBatch([q for q, _ in seqs], [st for _, st in seqs], [lens[t] for t in tpi])
            return self.teacher.hidden(sb, self.pad_id, self.teacher_batch, self.prefix_tokens)

        # anchor
        anchor_hidden = anchor_scale = None
        with_anchor = [t for t, tp in enumerate(tps) if tp.anchor_prompt is not None]
        if with_anchor:
            anchor_hidden = torch.zeros(n_rows, H, dtype=w.dtype, device=dev)
            anchor_scale = torch.zeros(n_rows, dtype=w.dtype, device=dev)
            off = row_offsets(lens)
            own = {t for t in with_anchor if student_rows is not None
                   and tps[t].anchor_prompt == batch.groups[batch.rollouts[tps[t].rollout].group].student_prompt}
            rest = [t for t in with_anchor if t not in own]
            h = run([tps[t].anchor_prompt for t in rest], rest) if rest else None
            c = 0
            for t in with_anchor:
                sl = slice(off[t], off[t] + lens[t])
                if t in own:
                    anchor_hidden[sl] = student_rows[sl]
                else:
                    anchor_hidden[sl] = h[c : c + lens[t]]
                    c += lens[t]
                anchor_scale[sl] = 1.0
        strength = torch.cat([torch.full((n,), tp.strength, dtype=w.dtype) for tp, n in zip(tps, lens)]).to(dev)
        tgt = TeacherTarget(weight=w, bias=b, anchor_hidden=anchor_hidden, anchor_scale=anchor_scale,
                            negative_pool=self.steering.negative_pool, negative_branch=self.steering.resolve_negative_branch(),
                            strength=strength, normalize=self.steering.normalize)
        if self.steering.pooling == "context":
            tgt.pos_hidden, tgt.pos_mask = self._pool_hidden([tp.pos for tp in tps], lens, run, dev, w.dtype)
            tgt.neg_hidden, tgt.neg_mask = self._pool_hidden([tp.neg for tp in tps], lens, run, dev, w.dtype)
            if tgt.pos_hidden is None:  # no positive context anywhere (opsd fallback rows only)
                tgt.pos_hidden = torch.zeros(0, n_rows, H, dtype=w.dtype, device=dev)
                tgt.pos_mask = torch.zeros(0, n_rows, dtype=torch.bool, device=dev)
        elif plan.directions is not None:
            tgt.direction = torch.cat([plan.directions, torch.zeros_like(plan.directions[:1])])
            zero = plan.directions.shape[0]
            tgt.row_direction = torch.cat([
                torch.full((n,), tp.direction if tp.direction >= 0 else zero, dtype=torch.long) for tp, n in zip(tps, lens)
            ]).to(dev)
        if anchor_hidden is None and tgt.pos_hidden is None and tgt.direction is None:
            tgt.anchor_hidden = torch.zeros(n_rows, H, dtype=w.dtype, device=dev)  # z0 = 0: uniform target
            tgt.anchor_scale = torch.zeros(n_rows, dtype=w.dtype, device=dev)
        return tgt

    @staticmethod
    def _pool_hidden(ctx_lists, lens, run, dev, dtype):
        """Stack per-target context passes into ``[K, rows, H]`` with a validity mask ``[K, rows]``."""
        K = max((len(c) for c in ctx_lists), default=0)
        if K == 0:
            return None, None
        prompts, tpi, slots = [], [], []
        for t, cl in enumerate(ctx_lists):
            for k, p in enumerate(cl):
                prompts.append(p)
                tpi.append(t)
                slots.append(k)
        h = run(prompts, tpi)
        n_rows, H = sum(lens), h.shape[1]
        hid = torch.zeros(K, n_rows, H, dtype=dtype, device=dev)
        mask = torch.zeros(K, n_rows, dtype=torch.bool, device=dev)
        off = row_offsets(lens)
        c = 0
        for t, k in zip(tpi, slots):
            hid[k, off[t] : off[t] + lens[t]] = h[c : c + lens[t]]
            mask[k, off[t] : off[t] + lens[t]] = True
            c += lens[t]
        return hid, mask


def _has_dropout(policy) -> bool:
    """A dropout module with p > 0 (e.g. ``model.lora_dropout``) or a config attention dropout: the
    student's training-mode forward is then not the live teacher's eval-mode pass."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in policy.modules()):
        return True
    cfg = getattr(policy, "config", None)
    return bool(getattr(cfg, "attention_dropout", 0.0) or 0.0)


def _subset(items: list, cap: int, rng: random.Random) -> list:
    """A seeded random subset of at most ``cap`` items (order kept)."""
    if len(items) <= cap:
        return list(items)
    keep = sorted(rng.sample(range(len(items)), cap))
    return [items[i] for i in keep]


DISTILL_NOOP_HINT = "set steering.no_positive=reference|opsd, raise rollout.num_generations, or use an easier task"


def build_ogls(cfg, policy, teacher: Teacher, prompts: PromptBuilder, steering: SteeringConfig) -> OGLSSD:
    """:class:`OGLSSD` with ``steering`` and the run's loss, limits and seed (OGLS-SD, OPSD, the hybrid's OPSD part)."""
    return OGLSSD(policy, teacher, prompts, steering, cfg.loss, cfg.rollout.max_new_tokens, seed=cfg.train.seed,
                  teacher_batch=cfg.train.micro_batch_size)


@register_algorithm(
    "ogls_sd", "OGLS-SD (method.md §3): the teacher steered along the contrast of correct vs incorrect rollouts",
    needs_siblings=True, default_teacher="live", noop_hint=DISTILL_NOOP_HINT,
    methods={
        # OGLS-SD as shipped: the default config, unmodified (context pooling, live anchor, all-wrong groups skipped)
        "ogls_sd": ([], "OGLS-SD as shipped (defaults: context pooling, live anchor, all-wrong groups skipped)", True),
        # the anchor variants and the lambda = 0 control (docs/algorithms/ogls_sd.md, "The anchor")
        "ogls_frozen": (["teacher.kind=frozen"], "OGLS-SD with a frozen theta_0 anchor (the earlier default)", True),
        "ogls_ema": (["teacher.kind=ema", "teacher.ema_decay=0.9"], "OGLS-SD with a fast EMA anchor (decay 0.9)", True),
        "ogls_lambda0": (["steering.strength=0"],
                         "control: OGLS-SD with lambda = 0 (live anchor = no distillation pull; only the tail SFT acts)", True),
        "ogls_ref": (["steering.no_positive=reference", "steering.fallback_reference=plain"],
                     "OGLS-SD as shipped, but all-wrong groups use the task's student-style reference as the positive context",
                     True),
        # issue 19's ablations at equal budgets: the dose-response in lambda (0 = ogls_lambda0, 0.5 = ogls_sd),
        # the negative branch as we first pooled it (mean of log-probabilities); the EMA anchor is ogls_ema above
        "ogls_lam0_5": (["steering.strength=0.5"], "OGLS-SD with lambda = 0.5 (dose-response; the default since 2026-12-02)"),
        "ogls_lam1": (["steering.strength=1"], "OGLS-SD as shipped with lambda = 1 (dose-response; the default lambda until 2026-12-02)"),
        "ogls_lam2": (["steering.strength=2"], "OGLS-SD as shipped with lambda = 2 (dose-response)"),
        "ogls_lam4": (["steering.strength=4"], "OGLS-SD as shipped with lambda = 4 (dose-response)"),
        "ogls_meanlog": (["steering.negative_branch=mean_log"],
                         "OGLS-SD as shipped with the mean of log-probabilities over the negative contexts as zneg (the "
                         "default until 2026-12-02; shipped: RLCSD's log of the mean probability)"),
        # the clip comparison (docs/results.md "Clipping")
        "ogls_safe": (["loss.clip=safe", "loss.clip_tau=0.05"], "OGLS-SD as shipped with the gradient-safe clip (tau 0.05)"),
        "ogls_global": (["steering.pooling=global"], "OGLS-SD with global pooling (live anchor)"),
        # the methods of the first comparison (docs/results.md history): frozen anchor, plain-reference fallback
        "ogls_context": (["teacher.kind=frozen", "steering.pooling=context", "steering.no_positive=reference",
                          "steering.fallback_reference=plain"],
                         "OGLS-SD, frozen anchor, context pooling; all-wrong fallback: the plain reference"),
        "ogls_context_refpos": (["teacher.kind=frozen", "steering.pooling=context", "steering.no_positive=reference",
                                 "steering.fallback_reference=reference"],
                                "OGLS-SD, frozen anchor, context pooling; all-wrong fallback: the privileged (templated) reference"),
    },
)
def build_ogls_sd(cfg, policy, teacher: Teacher, prompts: PromptBuilder) -> OGLSSD:
    return build_ogls(cfg, policy, teacher, prompts, cfg.steering)
