"""The rollout contract every backend implements (imports no backend).

Contract (every backend): ``generate(prompts, params) -> list[Completion]`` in the order of
``prompts``; prompts are token ids and are never decoded or re-encoded; ``Completion.ids`` are
exactly the sampled tokens, ending with EOS when the model stopped (``finished``) and never
containing padding; ``Completion.logprobs`` (when the backend reports them, e.g. vLLM) holds the
sampling log-probability of each of those tokens. ``sync_weights(model)`` is called after every
optimizer step (a no-op for the HF backend, which generates with the training model itself);
``close()`` releases the engine.

A backend module registers its builder with :func:`register_backend`; ``rollout.backend`` (and
``eval.backend``) are looked up in :data:`ogls_sd.registry.BACKENDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import nn

from ..registry import BACKENDS


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class Completion:
    ids: list[int]
    finished: bool  # ended with EOS before the generation limit
    logprobs: list[float] | None = None  # sampling log-prob of each of ``ids`` (None: not reported)


class RolloutTimeout(RuntimeError):
    """A rollout-engine operation (generation, weight sync, ...) exceeded its time limit."""


class PromptTooLong(ValueError):
    """A prompt plus the generation limit does not fit the engine's maximum model length."""


def check_prompt_lengths(prompts: list[list[int]], max_new_tokens: int, max_model_len: int | None,
                         engine: str = "the rollout engine") -> None:
    """Raise :class:`PromptTooLong` before anything is sent when ``len(prompt) + max_new_tokens``
    exceeds ``max_model_len`` (an engine would otherwise truncate the prompt, e.g. a privileged
    prefix, or stop generating early without saying so). ``None`` skips the check."""
    if not max_model_len:
        return
    for i, p in enumerate(prompts):
        if not p:
            raise PromptTooLong(f"rollout prompt {i} is empty")
        if len(p) + max_new_tokens > max_model_len:
            raise PromptTooLong(
                f"rollout prompt {i} has {len(p)} tokens; with rollout.max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions, more than the maximum model length {max_model_len} of "
                f"{engine}. Shorten the prompt/templates, lower rollout.max_new_tokens or raise the engine's "
                f"limit (rollout.vllm_max_model_len); nothing was truncated.")


class RolloutBackend(Protocol):
    """What the trainer and the evaluation call on a backend."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    def sync_weights(self, model: nn.Module | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendSpec:
    """A registered rollout backend: ``rollout.backend=name`` builds it with ``build``."""

    name: str
    summary: str
    build: Callable  # (rollout_cfg, model, pad_id, eos_id, *, cfg, is_main_process, engine) -> RolloutBackend


def register_backend(name: str, summary: str):
    """Decorator of ``build(rollout, model, pad_id, eos_id, *, cfg, is_main_process, engine) ->
    RolloutBackend``: registers ``rollout.backend=name``. ``rollout`` is the ``rollout`` config
    section (``batch_size`` is ``eval.batch_size`` when the backend serves an evaluation), ``cfg``
    the whole run config (None in some tests), ``engine`` an engine injected by tests (or None)."""

    def wrap(build: Callable) -> Callable:
        BACKENDS.register(name, BackendSpec(name, summary, build))
        return build

    return wrap
