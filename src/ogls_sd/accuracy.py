"""Held-out accuracy of a policy on a task (greedy or sampled), with the training templates, and the
context-limit checks every generation uses. Loading a model to evaluate is :mod:`ogls_sd.loading`."""

from __future__ import annotations

from dataclasses import dataclass

from .data.example import Example
from .rewards.functions import RewardSet
from .rollout.contract import PromptTooLong, RolloutBackend, SamplingParams
from .rollout.hf import HFBackend
from .templates import PromptBuilder


def context_limit(model) -> int | None:
    """The model's context (``config.max_position_embeddings``; also through PEFT / DDP wrappers),
    or None when the model does not say."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_prompt_fits(example: Example, kind: str, n_tokens: int, max_new_tokens: int, limit: int | None,
                      setting: str = "rollout.max_new_tokens", where: str = "example") -> None:
    """The one context rule (training rollouts, held-out accuracy, ``ogls-sd eval``): a prompt plus
    the generation limit must fit the model's context, or generation would run past it (transformers
    only warns) or truncate. Raises :class:`~ogls_sd.rollout.PromptTooLong` (a ``ValueError``)
    naming the example, the prompt kind and the setting to change; ``limit`` None or 0 skips it."""
    if limit and n_tokens + max_new_tokens > limit:
        raise PromptTooLong(
            f"{where} {example.id or example.problem[:40]!r}: the {kind} prompt has {n_tokens} tokens; with "
            f"{setting}={max_new_tokens} it exceeds the model's context of {limit} tokens. Lower {setting}, "
            f"shorten templates.{kind}, or filter long problems (data.max_chars)."
        )


def check_eval_prompts(examples: list[Example], prompt_ids: list[list[int]], max_new_tokens: int,
                       limit: int | None, where: str = "held-out example", kind: str = "student",
                       setting: str = "eval.max_new_tokens") -> None:
    """:func:`check_prompt_fits` for evaluation prompts (``kind`` prompts; ``setting`` names the limit)."""
    for ex, ids in zip(examples, prompt_ids):
        check_prompt_fits(ex, kind, len(ids), max_new_tokens, limit, setting, where)


@dataclass
class EvalResult:
    accuracy: float
    n: int
    completions: list[str]
    correct: list[bool]
    mean_length: float
    rewards: list[float] | None = None  # with reward functions: each completion's reward


def evaluate_accuracy(model, tokenizer, prompts: PromptBuilder, task, examples: list[Example],
                      max_new_tokens: int, batch_size: int = 100, params: SamplingParams | None = None,
                      prompt_ids: list[list[int]] | None = None, kind: str = "student",
                      rewards: RewardSet | None = None, where: str = "held-out example",
                      setting: str = "eval.max_new_tokens", backend: RolloutBackend | None = None) -> EvalResult:
    """Greedy (default) accuracy of ``model`` on ``examples``, from the student prompts or from
    ``prompt_ids`` (one per example; ``kind`` names them in errors, e.g. the warm start's privileged
    and context formats). Graded by ``rewards`` (the run's reward functions: correct = reward >
    ``reward.success_threshold``) or, without them, by ``task.reward`` > 0.5. A prompt that cannot
    fit the model's context with ``max_new_tokens`` is an error (:func:`check_prompt_fits`), before
    anything is generated; its message names the example as ``where`` and the limit as ``setting``.

    ``backend`` generates (any rollout backend holding ``model``'s weights, e.g. the one
    :func:`ogls_sd.rollout.build_eval_backend` builds for ``eval.backend``); the default is
    :class:`~ogls_sd.rollout.hf.HFBackend` on ``model`` with ``batch_size``."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    ids = prompt_ids if prompt_ids is not None else [prompts.student_ids(ex) for ex in examples]
    check_eval_prompts(examples, ids, params.max_new_tokens, context_limit(model), where, kind, setting)
    backend = backend if backend is not None else HFBackend(model, prompts.pad_id, prompts.eos_id, batch_size)
    comps = backend.generate(ids, params)
    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in comps]
    scores = None
    if rewards is not None:
        shown = [tokenizer.decode(p, skip_special_tokens=False) for p in ids]
        scores = rewards.score(shown, texts, examples)
        correct = rewards.correct(scores)
    else:
        correct = [task.reward(t, ex.answer) > 0.5 for t, ex in zip(texts, examples)]
    n = len(examples)
    return EvalResult(sum(correct) / max(1, n), n, texts, correct, sum(len(c.ids) for c in comps) / max(1, n), scores)
