"""Algorithms: each turns a step's rollouts into named loss terms and metrics."""

from __future__ import annotations

from .base import Group, Rollout, StepBatch
from .ogls_sd import OGLSSD
from .opsd import opsd_steering


def build_algorithm(cfg, policy, teacher, prompts):
    """The algorithm named by ``cfg.train.algorithm``."""
    name = cfg.train.algorithm
    if name == "ogls_sd":
        steering = cfg.steering
    elif name == "opsd":
        steering = opsd_steering(cfg.steering)
    else:
        raise ValueError(f"train.algorithm: unknown {name!r}")
    algo = OGLSSD(policy, teacher, prompts, steering, cfg.loss, cfg.rollout.max_new_tokens, seed=cfg.train.seed)
    algo.name = name
    return algo


__all__ = ["Group", "OGLSSD", "Rollout", "StepBatch", "build_algorithm"]
