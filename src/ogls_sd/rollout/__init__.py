"""Rollout backends: prompt ids in, completion ids out.

* :mod:`.contract` — the types every backend speaks (:class:`SamplingParams`, :class:`Completion`,
  :class:`RolloutTimeout`, :class:`PromptTooLong`, :func:`check_prompt_lengths`); imports no backend.
* :mod:`.hf` — :class:`HFBackend`, ``transformers`` ``generate`` with the training model (CPU or GPU).
* :mod:`.vllm_backend` — :class:`~.vllm_backend.VLLMBackend`, a colocated vLLM engine or a vLLM
  server (GPU only; imported only when ``rollout.backend=vllm``).

Imports point one way: backends import the contract, never each other; this module picks one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from .contract import Completion, PromptTooLong, RolloutBackend, RolloutTimeout, SamplingParams, check_prompt_lengths
from .hf import HFBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config, RolloutConfig


def build_backend(rollout: "RolloutConfig", model: nn.Module, pad_id: int, eos_id: int, *,
                  cfg: "Config | None" = None, is_main_process: bool = True, engine: Any = None):
    """The rollout backend named by ``rollout.backend``: :class:`HFBackend` (``hf``) or
    :class:`ogls_sd.rollout.vllm_backend.VLLMBackend` (``vllm``, colocated engine or HTTP server).

    ``cfg`` (the whole run config) supplies what the vLLM backend needs besides ``rollout``: seed,
    output directory (exported weights / adapters), dtype, LoRA settings. ``engine`` injects a
    ready engine (an ``vllm.LLM``-like object for colocate, a server client for server) - tests use
    it with fakes.
    """
    if rollout.backend == "hf":
        return HFBackend(model, pad_id, eos_id, rollout.batch_size)
    if rollout.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend.from_config(rollout, model, pad_id, eos_id, cfg=cfg, is_main_process=is_main_process,
                                       engine=engine)
    raise ValueError(f"rollout.backend: unknown backend {rollout.backend!r}")


__all__ = ["Completion", "HFBackend", "PromptTooLong", "RolloutBackend", "RolloutTimeout", "SamplingParams",
           "build_backend", "check_prompt_lengths"]
