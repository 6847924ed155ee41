"""SDPO: self-distillation from a successful sibling, with TRL 1.16's semantics
(``trl.experimental.sdpo.SDPOTrainer`` at its defaults ``distillation_weight = 1``,
``use_successful_as_teacher = True``, no environment feedback; docs/algorithms/sdpo.md).

Per prompt, the G rollouts' rewards mark successes (``reward >= sdpo.success_threshold``). Rollout
``i`` gets as demonstration the *first* success of its group in rollout order, skipping ``i``
itself when ``sdpo.dont_reprompt_on_self_success``; a rollout without one (a group without a
success, or the group's only success) gets no distillation term but still counts in the batch mean.
The teacher (the ``teacher.kind`` weights: frozen / ema / live for TRL's base / ema / live) scores
the rollout's own completion ids after the re-prompt (``sdpo.reprompt_template`` around the
student's user message and ``sdpo.solution_template`` around the demonstration's ids). The loss

    L = (1 / B) Σ_{i with a demonstration} (1 / |y_i|) Σ_t ℓ_{i,t}

(``B`` = the step's rollouts with at least one token) with the per-token ``ℓ`` of ``sdpo.mode``
(:mod:`ogls_sd.losses.sdpo`), student and teacher logits divided by ``rollout.temperature``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import ConfigError, _Section, opt
from ..losses.sdpo import MODES, sdpo_loss
from ..modeling import SeqBatch, lm_head
from ..teacher import Teacher
from ..templates import PromptBuilder, join_completion
from .base import Algorithm, EMPTY_METRIC, StepBatch, StepPlan, chunks, loss_dtype, register_algorithm, student_hidden

TRL_REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
TRL_SOLUTION = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"


@dataclass
class SDPOConfig(_Section):
    _section = "sdpo"
    _positive = ("top_k", "max_reprompt_tokens")
    _unit = ("alpha",)
    _trl = {"distillation_mode": "mode", "distillation_alpha": "alpha", "distillation_topk": "top_k",
            "distillation_add_tail": "add_tail", "success_reward_threshold": "success_threshold",
            "dont_reprompt_on_self_success": "dont_reprompt_on_self_success", "reprompt_template": "reprompt_template",
            "solution_template": "solution_template", "remove_thinking_from_demonstration": "remove_thinking",
            "max_reprompt_len": "max_reprompt_tokens"}  # TRL SDPOConfig names (docs/trl_names.md)
    mode: str = opt("sampled_token", "Distillation objective (TRL distillation_mode): sampled_token = reverse KL through the score function sg(log p_S(y) - log p_T(y)) * log p_S(y) at the sampled token (needs sdpo.alpha=1); topk_logits = divergence on the student's top sdpo.top_k tokens; full_logits = divergence over the whole vocabulary.", choices=MODES)
    alpha: float = opt(1.0, "Divergence interpolation (TRL distillation_alpha): 0 = forward KL(p_T||p_S), 1 = reverse KL(p_S||p_T), in between alpha*KL(p_T||m) + (1-alpha)*KL(p_S||m), m = alpha*p_T + (1-alpha)*p_S.")
    top_k: int = opt(20, "mode=topk_logits: size of the student's top-k support (TRL distillation_topk, which has no default).")
    add_tail: bool = opt(False, "mode=topk_logits: add one bucket holding the mass outside the top-k instead of renormalising the top-k (TRL distillation_add_tail).")
    success_threshold: float = opt(1.0, "A rollout is a success (a possible demonstration) when its reward >= this (TRL success_reward_threshold).")
    dont_reprompt_on_self_success: bool = opt(True, "A rollout is never its own demonstration: a correct rollout is distilled toward another success of its group, or not at all when it is the only one (TRL dont_reprompt_on_self_success).")
    prompt: str = opt("trl", "The teacher's prompt: trl = TRL's re-prompt (sdpo.reprompt_template, sdpo.solution_template), or context = this project's context template (templates.context, the earlier-attempt format the tiny model's warm start teaches) with the demonstration as the attempt.", choices=("trl", "context"))
    reprompt_template: str = opt(TRL_REPROMPT, "Teacher user message (TRL reprompt_template): {prompt} = the student's user message, {solution} = sdpo.solution_template with the demonstration, {feedback} = '' (no environment feedback).")
    solution_template: str = opt(TRL_SOLUTION, "How the demonstration appears in the re-prompt (TRL solution_template); {successful_previous_attempt} = the demonstration's token ids, spliced in (trailing EOS/pad removed).")
    remove_thinking: bool = opt(False, "Drop <think>...</think> blocks from the demonstration (TRL remove_thinking_from_demonstration; needs single-token tags).")
    max_reprompt_tokens: int = opt(10240, "The teacher prompt keeps its last N tokens (TRL max_reprompt_len truncates from the left).")

    def validate(self) -> None:
        if self.mode == "sampled_token" and self.alpha != 1.0:
            raise ConfigError(f"sdpo.alpha: mode sampled_token is the reverse KL and needs alpha = 1, got {self.alpha}")
        _check_fields("sdpo.reprompt_template", self.reprompt_template, {"prompt", "solution", "feedback"}, "solution")
        _check_fields("sdpo.solution_template", self.solution_template, {"successful_previous_attempt"},
                      "successful_previous_attempt")


def _check_fields(key: str, template: str, allowed: set[str], required: str) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: not a format string ({e})") from None
    bad = sorted(set(names) - allowed)
    if bad:
        raise ConfigError(f"{key}: unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; "
                          f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}")
    if names.count(required) != 1:
        raise ConfigError(f"{key}: must contain {{{required}}} exactly once")


def demonstrations(rewards: list[float], threshold: float, exclude_self: bool) -> list[int | None]:
    """Per rollout of a group, the position of its demonstration in the group (TRL's rule: the
    first rollout with ``reward >= threshold``, not itself when ``exclude_self``), or None."""
    ok = [j for j, r in enumerate(rewards) if r >= threshold]
    return [next((j for j in ok if not (exclude_self and j == i)), None) for i in range(len(rewards))]


@dataclass
class SDPOPlan(StepPlan):
    """``teacher_prompts``: rollout index -> re-prompt ids (the distilled rollouts)."""

    GLOBAL_SUMS = ("n_seq",)  # summed over data-parallel ranks (distributed.globalize_plan)

    batch: StepBatch
    teacher_prompts: dict[int, list[int]]
    demo: dict[int, int]  # rollout index -> its demonstration's rollout index
    n_seq: int  # B: rollouts of the step with at least one token
    metrics: dict[str, float] = field(default_factory=dict)

    def micro_batches(self, size: int) -> list[list[int]]:
        work = sorted(self.teacher_prompts)
        return chunks(work, size)


class SDPO(Algorithm):
    """TRL's SDPO (pure self-distillation) on this project's rollouts and teacher weights."""

    name = "sdpo"

    def __init__(self, policy, teacher: Teacher, prompts: PromptBuilder, sdpo: SDPOConfig, temperature: float = 1.0,
                 chunk_size: int = 1024, teacher_batch: int = 16):
        self.policy, self.teacher, self.prompts, self.cfg = policy, teacher, prompts, sdpo
        self.temperature, self.chunk_size = temperature, chunk_size
        self.teacher_batch = max(1, teacher_batch)
        self.pad_id = prompts.pad_id

    @torch.no_grad()
    def plan(self, batch: StepBatch, step: int) -> SDPOPlan:
        c = self.cfg
        prompts: dict[int, list[int]] = {}
        demo: dict[int, int] = {}
        with_success = 0
        for g in batch.groups:
            idx = [i for i in g.rollouts if batch.rollouts[i].ids]  # empty rollouts: never used
            picks = demonstrations([batch.rollouts[i].reward for i in idx], c.success_threshold,
                                   c.dont_reprompt_on_self_success)
            with_success += any(batch.rollouts[i].reward >= c.success_threshold for i in idx)
            cache: dict[int, list[int]] = {}
            for i, p in zip(idx, picks):
                if p is None:
                    continue
                j = idx[p]
                if j not in cache:
                    cache[j] = self.teacher_prompt(g.example, batch.rollouts[j].ids)
                prompts[i], demo[i] = cache[j], j
        n_seq = sum(1 for r in batch.rollouts if r.ids)
        metrics = {
            "sdpo/success_group_frac": with_success / max(1, len(batch.groups)),
            "sdpo/reprompt_frac": len(prompts) / max(1, n_seq),
            "targets": float(len(prompts)),
            EMPTY_METRIC: float(batch.empty_rollouts()),
        }
        return SDPOPlan(batch, prompts, demo, n_seq, metrics)

    def teacher_prompt(self, example, demo_ids: list[int]) -> list[int]:
        """The teacher's prompt with the demonstration ``demo_ids`` (``sdpo.prompt``), its last
        ``sdpo.max_reprompt_tokens`` tokens."""
        c = self.cfg
        if c.prompt == "context":
            ids = self.prompts.context_ids(example, demo_ids, len(demo_ids), c.remove_thinking)
        else:
            ids = self.prompts.reprompt_ids(example, demo_ids, c.reprompt_template, c.solution_template,
                                            c.remove_thinking)
        return ids[-c.max_reprompt_tokens :]

    def loss(self, plan: SDPOPlan, micro: list[int]) -> tuple[Tensor, dict[str, float]]:
        """Σ over the distilled rollouts of ``micro`` of ``(1 / (|y_i| B)) Σ_t ℓ_{i,t}``."""
        batch = plan.batch
        sel = [i for i in micro if i in plan.teacher_prompts]
        h_s, _ = student_hidden(self.policy, batch, sel, self.pad_id)
        total = h_s.sum() * 0.0
        if not sel or plan.n_seq <= 0:
            return total, {}
        lens = [len(batch.rollouts[i].ids) for i in sel]
        dev = h_s.device
        wdtype = loss_dtype(h_s.dtype)
        weights = torch.cat([torch.full((n,), 1.0 / (n * plan.n_seq), dtype=torch.float64) for n in lens])
        ids = torch.tensor([t for i in sel for t in batch.rollouts[i].ids], device=dev)
        h_t = self._teacher_hidden(plan, sel)
        w_s, b_s = lm_head(self.policy)
        w_t, b_t = self.teacher.head()
        c = self.cfg
        loss, per_token, st = sdpo_loss(h_s, w_s, b_s, h_t, w_t, b_t, ids, weights.to(dev, wdtype),
                                        temperature=self.temperature, mode=c.mode, alpha=c.alpha, top_k=c.top_k,
                                        add_tail=c.add_tail, chunk_size=self.chunk_size)
        sums = st.sum(1).tolist()
        return total + loss, {"distill_loss": float(loss.detach()), "sdpo_token_loss_sum": float(per_token.sum()),
                              "kl_sum": sums[0], "sdpo_rkl_sum": sums[1], "teacher_entropy_sum": sums[2],
                              "student_entropy_sum": sums[3], "distill_rows": float(per_token.numel())}

    @torch.no_grad()
    def _teacher_hidden(self, plan: SDPOPlan, sel: list[int]) -> Tensor:
        """Teacher hidden states at the completion positions of rollouts ``sel`` after their re-prompts."""
        ro = [plan.batch.rollouts[i] for i in sel]
        joined = [join_completion(plan.teacher_prompts[i], r.ids) for i, r in zip(sel, ro)]
        sb = SeqBatch([q for q, _ in joined], [st for _, st in joined], [len(r.ids) for r in ro])
        return self.teacher.hidden(sb, self.pad_id, self.teacher_batch)

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        rows = agg.get("distill_rows", 0.0)

        def per_row(key: str) -> float:
            return agg.get(key, 0.0) / rows if rows else 0.0

        return {"distill_loss": agg.get("distill_loss", 0.0), "kl/token": per_row("kl_sum"),
                "entropy/teacher": per_row("teacher_entropy_sum"), "entropy/student": per_row("student_entropy_sum"),
                "sdpo/token_loss": per_row("sdpo_token_loss_sum"), "sdpo/reverse_kl_token": per_row("sdpo_rkl_sum")}


@register_algorithm(
    "sdpo", "SDPO (TRL 1.16): distil the policy re-prompted with a successful sibling rollout (sdpo.mode)",
    config_section=SDPOConfig,
    needs_teacher=lambda cfg: True,
    needs_siblings=True,
    default_teacher="ema",
    default_ema_decay=0.95,  # TRL's teacher_update_rate 0.05
    noop_hint=("no rollout had a successful sibling (groups without a success, or a success alone in its group): "
               "raise rollout.num_generations, use an easier task, lower sdpo.success_threshold or set "
               "sdpo.dont_reprompt_on_self_success=false"),
    methods={
        "sdpo": (["teacher.kind=ema", "teacher.ema_decay=0.95"],
                 "SDPO as TRL 1.16 defaults it: EMA teacher (update rate 0.05) re-prompted with a successful sibling, "
                 "sampled-token reverse KL", True),
        "sdpo_full": (["teacher.kind=ema", "teacher.ema_decay=0.95", "sdpo.mode=full_logits"],
                      "SDPO with the full-vocabulary reverse KL (sdpo.mode=full_logits)"),
        "sdpo_topk": (["teacher.kind=ema", "teacher.ema_decay=0.95", "sdpo.mode=topk_logits", "sdpo.add_tail=true"],
                      "SDPO on the student's top-20 tokens plus a tail bucket (sdpo.mode=topk_logits)"),
        "sdpo_live": (["teacher.kind=live"], "SDPO with the live policy as teacher (TRL teacher_model_kind=live)"),
        "sdpo_ctx": (["teacher.kind=ema", "teacher.ema_decay=0.95", "sdpo.prompt=context"],
                     "SDPO whose teacher reads the demonstration in this project's context template (the format the "
                     "warm start teaches) instead of TRL's re-prompt"),
    },
)
def build_sdpo(cfg, policy, teacher, prompts) -> SDPO:
    return SDPO(policy, teacher, prompts, cfg.sdpo, temperature=cfg.rollout.temperature,
                chunk_size=cfg.loss.chunk_size, teacher_batch=cfg.train.micro_batch_size)
