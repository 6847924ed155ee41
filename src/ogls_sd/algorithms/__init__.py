"""Algorithms: each turns a step's rollouts into named loss terms and metrics.

``train.algorithm`` picks one (see ``docs/algorithms/``):

* ``ogls_sd``: OGLS-SD (method.md §3), :class:`OGLSSD` with ``steering``;
* ``opsd``: plain OPSD (§1), the same class with the OPSD steering settings (``opsd.py``);
* ``sft``: NLL on reference solutions, no rollouts (``sft.py``);
* ``rft``: NLL on the model's own correct rollouts (``sft.py``);
* ``grpo``: group-normalised advantages, PPO-clipped token-level policy gradient (``grpo.py``);
* ``opsd_grpo``: ``L_GRPO + hybrid.alpha · L_OPSD`` (``hybrid.py``).
"""

from __future__ import annotations

from .base import Algorithm, Group, Rollout, StepBatch
from .grpo import GRPO, group_advantages
from .hybrid import OPSDGRPO
from .ogls_sd import OGLSSD
from .opsd import opsd_steering
from .sft import RFT, SFT


def needs_teacher(cfg) -> bool:
    """Whether ``cfg.train.algorithm`` reads the teacher weights (SFT, RFT and GRPO without a KL
    term do not: the trainer then keeps no teacher copy)."""
    name = cfg.train.algorithm
    if name in ("sft", "rft"):
        return False
    if name == "grpo":
        return cfg.grpo.kl_coef > 0
    return True


def teacher_kind(cfg) -> str:
    """The teacher weights a run builds: ``teacher.kind`` resolved for the algorithm (``auto``: live
    for ogls_sd, frozen otherwise), or ``live`` (no copy at all) when the algorithm never reads them."""
    return cfg.teacher.resolve(cfg.train.algorithm) if needs_teacher(cfg) else "live"


def build_algorithm(cfg, policy, teacher, prompts):
    """The algorithm named by ``cfg.train.algorithm``."""
    name = cfg.train.algorithm

    def ogls(steering):
        return OGLSSD(policy, teacher, prompts, steering, cfg.loss, cfg.rollout.max_new_tokens, seed=cfg.train.seed,
                      teacher_batch=cfg.train.micro_batch_size)

    def grpo():
        return GRPO(policy, teacher, prompts, cfg.grpo, cfg.loss, temperature=cfg.rollout.temperature,
                    plan_batch=cfg.train.micro_batch_size)

    if name == "ogls_sd":
        algo = ogls(cfg.steering)
    elif name == "opsd":
        algo = ogls(opsd_steering(cfg.steering))
    elif name == "sft":
        algo = SFT(policy, prompts, cfg.sft, cfg.loss)
    elif name == "rft":
        algo = RFT(policy, prompts, cfg.loss)
    elif name == "grpo":
        algo = grpo()
    elif name == "opsd_grpo":
        opsd = ogls(opsd_steering(cfg.steering))
        opsd.name = "opsd"
        algo = OPSDGRPO(grpo(), opsd, cfg.hybrid.alpha)
    else:
        raise ValueError(f"train.algorithm: unknown {name!r}")
    algo.name = name
    return algo


__all__ = ["Algorithm", "GRPO", "Group", "OGLSSD", "OPSDGRPO", "RFT", "Rollout", "SFT", "StepBatch",
           "build_algorithm", "group_advantages", "needs_teacher", "teacher_kind"]
