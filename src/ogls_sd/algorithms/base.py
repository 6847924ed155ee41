"""What every algorithm sees: the rollouts of one step, grouped by prompt, and its tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.example import Example
from ..registry import ALGORITHMS, SECTIONS


@dataclass
class Rollout:
    """One sampled completion. ``ids`` are the exact sampled tokens (EOS included if ``finished``).
    It is correct (the positive pool) when ``reward > threshold`` (``reward.success_threshold``)."""

    group: int
    ids: list[int]
    finished: bool
    reward: float = 0.0
    threshold: float = 0.5

    @property
    def correct(self) -> bool:
        return self.reward > self.threshold


@dataclass
class Group:
    """A prompt and its G rollouts. ``student_prompt``/``teacher_prompt`` are token ids."""

    example: Example
    student_prompt: list[int]
    teacher_prompt: list[int]
    rollouts: list[int] = field(default_factory=list)  # indices into the step's rollout list


@dataclass
class StepBatch:
    groups: list[Group]
    rollouts: list[Rollout]

    def pools(self, g: int, nonempty: bool = False) -> tuple[list[int], list[int]]:
        """``(P, N)``: indices of correct and incorrect rollouts of group ``g`` (only those with at
        least one token when ``nonempty``)."""
        idx = self.groups[g].rollouts
        if nonempty:
            idx = [i for i in idx if self.rollouts[i].ids]
        return [i for i in idx if self.rollouts[i].correct], [i for i in idx if not self.rollouts[i].correct]

    def empty_rollouts(self) -> int:
        """Rollouts without a single token (a backend that returned nothing). Every algorithm
        skips them (no loss row, no context, no pooled direction) and reports the count as the
        step metric ``rollouts/empty``."""
        return sum(1 for r in self.rollouts if not r.ids)


def chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive pieces of at most ``size`` (the last may be shorter)."""
    return [items[s : s + size] for s in range(0, len(items), size)]


def length_chunks(items: list[int], size: int, length) -> list[list[int]]:
    """``items`` in micro-batches of at most ``size``, longest first (``length(item)``, ties in
    order): a forward pads every sequence to the longest of its micro-batch, so grouping similar
    lengths pads less. The step's loss is a sum over micro-batches, whatever their composition."""
    return chunks(sorted(items, key=lambda i: -length(i)), size)


class StepPlan:
    """What the trainer and the distributed code read of the plan an algorithm makes for a step
    (every algorithm's plan class derives from it):

    * ``micro_batches(size) -> list[list[int]]``: the work items of the step, in micro-batches;
    * ``metrics``: per-step metrics known at planning time;
    * ``GLOBAL_SUMS``: names of the loss normalisers that are summed over data-parallel ranks
      before the loss (:func:`ogls_sd.distributed.globalize_plan`), so that N processes take the
      step one process takes on the whole batch;
    * ``subplans()``: the plans this one is made of (hybrids), globalized too.
    """

    GLOBAL_SUMS: tuple[str, ...] = ()
    metrics: dict[str, float]

    def micro_batches(self, size: int) -> list[list[int]]:
        raise NotImplementedError

    def subplans(self) -> tuple["StepPlan", ...]:
        return ()


class Algorithm:
    """What the trainer expects of an algorithm (besides ``plan`` and ``loss``).

    * ``plan(batch, step) -> StepPlan`` (no grad);
    * ``loss(plan, micro) -> (loss, metrics)``; the losses of all micro-batches of a step sum to
      the step's objective, and the trainer sums the ``metrics`` over micro-batches;
    * ``needs_rollouts``: False when the step needs no generation (SFT): the batch then has groups
      and no rollouts;
    * ``inner_steps``: optimizer steps the trainer takes on one plan (PPO epochs; 1 for all but GRPO);
    * ``step_metrics(agg)``: per-step metrics from the summed loss metrics ``agg`` (the trainer
      merges them into ``metrics.jsonl``).
    """

    name = ""
    needs_rollouts = True
    inner_steps = 1

    def step_metrics(self, agg: dict[str, float]) -> dict[str, float]:
        return {}


def distill_step_metrics(agg: dict[str, float]) -> dict[str, float]:
    """The distillation metrics of method.md §6 (docs/metrics.md) from summed loss metrics: the
    loss terms, and per distilled row the teacher-student KL, both entropies and the steering RMS."""
    rows = agg.get("distill_rows", 0.0)

    def per_row(key: str) -> float:
        return agg.get(key, 0.0) / rows if rows else 0.0

    return {
        "distill_loss": agg.get("distill_loss", 0.0),
        "tail_nll": agg.get("tail_nll", 0.0),
        "kl/token": per_row("kl_sum"),
        "entropy/teacher": per_row("teacher_entropy_sum"),
        "entropy/student": per_row("student_entropy_sum"),
        "steer/rms": per_row("steer_rms_sum"),
        "clip/frac": agg.get("clipped_sum", 0.0) / agg["clip_den_sum"] if agg.get("clip_den_sum") else 0.0,
    }


EMPTY_METRIC = "rollouts/empty"


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of loss normalisers, row weights and weighted sums: float32, or the hidden states'
    dtype when that is wider (float64). In bf16 a weight 1/N is off by up to 2^-9, and a step's
    weights would not sum to 1."""
    return torch.promote_types(dtype, torch.float32)


def student_hidden(policy, batch: StepBatch, micro: list[int], pad_id: int):
    """The student's final hidden states at every completion position of the rollouts ``micro``
    (student prompt + full completion), ``[Σ len, H]``, and the row offset of each rollout
    (``offsets[k]`` .. ``offsets[k + 1]`` are rollout ``micro[k]``)."""
    from ..modeling import SeqBatch, completion_hidden
    from ..templates import join_completion

    ro = [batch.rollouts[i] for i in micro]
    joined = [join_completion(batch.groups[r.group].student_prompt, r.ids) for r in ro]
    sb = SeqBatch([q for q, _ in joined], [st for _, st in joined], [len(r.ids) for r in ro])
    h = completion_hidden(policy, sb, pad_id)
    offsets = [0]
    for r in ro:
        offsets.append(offsets[-1] + len(r.ids))
    return h, offsets


def _always(cfg) -> bool:
    return True


@dataclass(frozen=True)
class CompareMethod:
    """A named ``ogls-sd compare`` method: ``train.algorithm`` plus overrides."""

    algorithm: str
    overrides: tuple[str, ...]
    description: str
    default: bool = False  # in compare's default method list


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the rest of the package knows about a registered algorithm (``register_algorithm``)."""

    name: str
    summary: str
    build: Callable  # (cfg, policy, teacher, prompts) -> Algorithm
    needs_teacher: Callable = _always  # cfg -> bool; False: the trainer keeps no teacher copy
    needs_siblings: bool = False  # learns from differences between a prompt's rollouts (G >= 2)
    default_teacher: str = "frozen"  # what teacher.kind=auto resolves to
    default_ema_decay: float = 0.999  # what teacher.ema_decay=auto resolves to
    noop_hint: str = "raise rollout.num_generations or use an easier task"
    config_section: type | None = None
    methods: tuple[tuple[str, CompareMethod], ...] = ()


def register_algorithm(name: str, summary: str, *, needs_teacher: Callable = _always, needs_siblings: bool = False,
                       default_teacher: str = "frozen", default_ema_decay: float = 0.999, noop_hint: str | None = None,
                       config_section: type | None = None, methods: dict | None = None):
    """Decorator of an algorithm's builder ``build(cfg, policy, teacher, prompts) -> Algorithm``:
    registers ``train.algorithm=name`` with everything the trainer, config validation, ``compare``
    and the CLI help read about it. ``config_section``: a ``config._Section`` dataclass whose
    ``_section`` name becomes ``cfg.<name>`` and a YAML section. ``methods``: compare method name ->
    ``(overrides, description[, in_default_list])``, each applied on top of ``train.algorithm=name``."""
    if default_teacher not in ("frozen", "ema", "live"):
        raise ValueError(f"register_algorithm({name!r}): default_teacher must be frozen, ema or live")
    if not 0 <= default_ema_decay <= 1:
        raise ValueError(f"register_algorithm({name!r}): default_ema_decay must be in [0, 1]")
    named = tuple((m, CompareMethod(name, tuple(v[0]), v[1], *v[2:])) for m, v in (methods or {}).items())

    def wrap(build: Callable) -> Callable:
        if config_section is not None:
            SECTIONS.register(config_section._section, config_section)
        ALGORITHMS.register(name, AlgorithmSpec(name, summary, build, needs_teacher, needs_siblings, default_teacher,
                                                default_ema_decay, noop_hint or AlgorithmSpec.noop_hint,
                                                config_section, named))
        return build

    return wrap


def compare_methods() -> dict[str, CompareMethod]:
    """Every registered compare method, in registration order."""
    return {m: cm for _, spec in ALGORITHMS.items() for m, cm in spec.methods}
