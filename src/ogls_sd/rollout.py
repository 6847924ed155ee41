"""Rollout backends: prompt ids in, completion ids out.

Contract (every backend): ``generate(prompts, params) -> list[Completion]`` in the order of
``prompts``; prompts are token ids and are never decoded or re-encoded; ``Completion.ids`` are
exactly the sampled tokens, ending with EOS when the model stopped (``finished``) and never
containing padding; ``Completion.logprobs`` (when the backend reports them, e.g. vLLM) holds the
sampling log-probability of each of those tokens. ``sync_weights(model)`` is called after every
optimizer step (a no-op for the HF backend, which generates with the training model itself).

:func:`build_backend` picks the backend named by ``rollout.backend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config, RolloutConfig


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


class HFBackend:
    """``transformers`` ``generate`` on left-padded prompt ids (no decode/re-encode)."""

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int, batch_size: int = 64):
        self.model, self.pad_id, self.eos_id, self.batch_size = model, pad_id, eos_id, batch_size

    def sync_weights(self, model: nn.Module | None = None) -> None:
        """No-op: generation uses the training model's own (already updated) weights."""

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel):  # DDP has no .generate
            model = model.module
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        out: list[Completion] = []
        try:
            for s in range(0, len(prompts), self.batch_size):
                chunk = prompts[s : s + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, width - len(p) :] = torch.tensor(p)
                    att[r, width - len(p) :] = 1
                kw = dict(do_sample=not params.greedy, max_new_tokens=params.max_new_tokens,
                          pad_token_id=self.pad_id, eos_token_id=self.eos_id)
                if not params.greedy:
                    kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)  # 0 disables (HF would otherwise default to 50)
                gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), **kw)
                for row in gen[:, width:].tolist():
                    if self.eos_id in row:
                        row = row[: row.index(self.eos_id) + 1]
                        out.append(Completion(row, True))
                    else:
                        out.append(Completion(row, False))
        finally:
            model.train(was_training)
        return out


def build_backend(rollout: "RolloutConfig", model: nn.Module, pad_id: int, eos_id: int, *,
                  cfg: "Config | None" = None, is_main_process: bool = True, engine: Any = None):
    """The rollout backend named by ``rollout.backend``: :class:`HFBackend` (``hf``) or
    :class:`ogls_sd.rollout_vllm.VLLMBackend` (``vllm``, colocated engine or HTTP server).

    ``cfg`` (the whole run config) supplies what the vLLM backend needs besides ``rollout``: seed,
    output directory (exported weights / adapters), dtype, LoRA settings. ``engine`` injects a
    ready engine (an ``vllm.LLM``-like object for colocate, a server client for server) - tests use
    it with fakes.
    """
    if rollout.backend == "hf":
        return HFBackend(model, pad_id, eos_id, rollout.batch_size)
    if rollout.backend == "vllm":
        from .rollout_vllm import VLLMBackend

        return VLLMBackend.from_config(rollout, model, pad_id, eos_id, cfg=cfg, is_main_process=is_main_process,
                                       engine=engine)
    raise ValueError(f"rollout.backend: unknown backend {rollout.backend!r}")
