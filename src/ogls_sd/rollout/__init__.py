"""Rollout backends: prompt ids in, completion ids out.

* :mod:`.contract` — the types every backend speaks (:class:`SamplingParams`, :class:`Completion`,
  :class:`RolloutTimeout`, :class:`PromptTooLong`, :func:`check_prompt_lengths`) and
  :func:`register_backend`; imports no backend.
* one module per backend, each registering itself in :data:`ogls_sd.registry.BACKENDS`: ``hf``
  (:mod:`.hf`, ``transformers`` ``generate`` with the training model, CPU or GPU), ``vllm``
  (:mod:`.vllm_backend`, a colocated vLLM engine or a vLLM server, GPU only; vLLM itself is
  imported only when such an engine starts), and whatever else the package holds.

Importing the package imports every backend module; :func:`build_backend` builds the one named by
``rollout.backend``, :func:`build_eval_backend` the one named by ``eval.backend``. Adding a backend
is one new module here. Imports point one way: backends import the contract, never each other.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from torch import nn

from ..registry import BACKENDS
from .contract import (BackendSpec, Completion, PromptTooLong, RolloutBackend, RolloutTimeout, SamplingParams,
                       check_prompt_lengths, register_backend)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .hf import HFBackend  # noqa: E402  (re-exported name)


def build_backend(rollout: Any, model: nn.Module, pad_id: int, eos_id: int, *, cfg: Any = None,
                  is_main_process: bool = True, engine: Any = None) -> RolloutBackend:
    """The rollout backend named by ``rollout.backend`` (the ``rollout`` config section), built by
    the module that registered it.

    ``cfg`` (the whole run config) supplies what a backend needs besides ``rollout`` (vLLM: seed,
    output directory for exported weights / adapters, dtype, LoRA settings). ``engine`` injects a
    ready engine (vLLM: an ``vllm.LLM``-like object for colocate, a server client for server) -
    tests use it with fakes.
    """
    if rollout.backend not in BACKENDS:  # config validation refuses it earlier; a hand-made section may not
        raise ValueError(f"rollout.backend: {BACKENDS.unknown(rollout.backend)}")
    spec: BackendSpec = BACKENDS[rollout.backend]
    return spec.build(rollout, model, pad_id, eos_id, cfg=cfg, is_main_process=is_main_process, engine=engine)


def build_eval_backend(cfg: Any, model: nn.Module, pad_id: int, eos_id: int, *, is_main_process: bool = True,
                       engine: Any = None) -> RolloutBackend:
    """The backend of a held-out evaluation: ``eval.backend``, built like a rollout backend from the
    ``rollout`` section with ``eval.batch_size`` as its batch size (``hf``, the default: exactly
    :class:`HFBackend` ``(model, pad_id, eos_id, eval.batch_size)``). Close it after use."""
    rollout = dataclasses.replace(cfg.rollout, backend=cfg.eval.backend, batch_size=cfg.eval.batch_size)
    return build_backend(rollout, model, pad_id, eos_id, cfg=cfg, is_main_process=is_main_process, engine=engine)


__all__ = ["BackendSpec", "Completion", "HFBackend", "PromptTooLong", "RolloutBackend", "RolloutTimeout",
           "SamplingParams", "build_backend", "build_eval_backend", "check_prompt_lengths", "register_backend"]
