"""OPSD (method.md §1): distil the privileged teacher p_φ(·|x, y*, y_<t) into the student on every
rollout. Implemented as the OGLS-SD configuration that method.md §3 names as exactly plain OPSD:
``pooling=global, strength=0, anchor=privileged, distill_on=all, tail_weight=0`` (and
``no_positive=opsd`` so all-incorrect groups are distilled too)."""

from __future__ import annotations

import dataclasses

from ..config import SteeringConfig
from .base import register_algorithm
from .ogls_sd import DISTILL_NOOP_HINT, OGLSSD, build_ogls

OPSD_STEERING = dict(pooling="global", strength=0.0, anchor="privileged", distill_on="all",
                     tail_weight=0.0, no_positive="opsd", negative_branch="mean_log")  # no negative pool: the default


def opsd_steering(base: SteeringConfig) -> SteeringConfig:
    """``base`` with the OPSD settings applied."""
    return dataclasses.replace(base, **OPSD_STEERING)


@register_algorithm(
    "opsd", "plain OPSD (method.md §1): the privileged teacher distilled into the student on every rollout",
    default_teacher="frozen", noop_hint=DISTILL_NOOP_HINT,
    methods={
        "opsd": ([], "OPSD: privileged teacher (frozen theta_0) distilled on every rollout", True),
        # the clip comparison (docs/results.md "Clipping"): the published per-entry clip and the gradient-safe one
        "opsd_entry": (["loss.clip=entry", "loss.clip_tau=0.05"], "OPSD with the published per-entry clip (tau 0.05)"),
        "opsd_safe": (["loss.clip=safe", "loss.clip_tau=0.05"], "OPSD with the gradient-safe clip (tau 0.05)"),
    },
)
def build_opsd(cfg, policy, teacher, prompts) -> OGLSSD:
    return build_ogls(cfg, policy, teacher, prompts, opsd_steering(cfg.steering))
