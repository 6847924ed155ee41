"""Algorithms: each turns a step's rollouts into named loss terms and metrics.

Every module of this package registers its algorithms with :func:`base.register_algorithm` (name,
builder, config section, default teacher, compare methods); importing the package imports them
all, and ``train.algorithm`` is looked up in :data:`ogls_sd.registry.ALGORITHMS`. Adding an
algorithm is one new module here (plus its tests and docs page in ``docs/algorithms/``):

* ``ogls_sd``: OGLS-SD (method.md §3), :class:`OGLSSD` with ``steering`` (``ogls_sd.py``);
* ``opsd``: plain OPSD (§1), the same class with the OPSD steering settings (``opsd.py``);
* ``sft``: NLL on reference solutions, no rollouts; ``rft``: NLL on the model's own correct rollouts (``sft.py``);
* ``grpo``: group-normalised advantages, PPO-clipped token-level policy gradient (``grpo.py``);
* ``opsd_grpo``: ``L_GRPO + hybrid.alpha · L_OPSD`` (``hybrid.py``);
* and whatever else the package holds (``ogls-sd train --help`` lists every registered name).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import ALGORITHMS
from .base import Algorithm, AlgorithmSpec, CompareMethod, Group, Rollout, StepBatch, compare_methods, register_algorithm

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .grpo import GRPO, group_advantages  # noqa: E402  (re-exported names)
from .hybrid import OPSDGRPO  # noqa: E402
from .ogls_sd import OGLSSD  # noqa: E402
from .sft import RFT, SFT  # noqa: E402


def algorithm_spec(cfg) -> AlgorithmSpec:
    """The registered spec of ``cfg.train.algorithm``."""
    return ALGORITHMS[cfg.train.algorithm]


def needs_teacher(cfg) -> bool:
    """Whether ``cfg.train.algorithm`` reads the teacher weights (SFT, RFT and GRPO without a KL
    term do not: the trainer then keeps no teacher copy)."""
    return bool(algorithm_spec(cfg).needs_teacher(cfg))


def teacher_kind(cfg) -> str:
    """The teacher weights a run builds: ``teacher.kind`` resolved for the algorithm (``auto``: the
    algorithm's registered default), or ``live`` (no copy at all) when the algorithm never reads them."""
    return cfg.teacher.resolve(cfg.train.algorithm) if needs_teacher(cfg) else "live"


def build_algorithm(cfg, policy, teacher, prompts):
    """The algorithm named by ``cfg.train.algorithm``."""
    algo = algorithm_spec(cfg).build(cfg, policy, teacher, prompts)
    algo.name = cfg.train.algorithm
    return algo


__all__ = ["Algorithm", "AlgorithmSpec", "CompareMethod", "GRPO", "Group", "OGLSSD", "OPSDGRPO", "RFT", "Rollout", "SFT",
           "StepBatch", "algorithm_spec", "build_algorithm", "compare_methods", "group_advantages", "needs_teacher",
           "register_algorithm", "teacher_kind"]
