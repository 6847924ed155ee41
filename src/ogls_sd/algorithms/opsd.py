"""OPSD (method.md §1): distil the privileged teacher p_φ(·|x, y*, y_<t) into the student on every
rollout. Implemented as the OGLS-SD configuration that method.md §3 names as exactly plain OPSD:
``pooling=global, strength=0, anchor=privileged, distill_on=all, tail_weight=0`` (and
``no_positive=opsd`` so all-incorrect groups are distilled too)."""

from __future__ import annotations

import dataclasses

from ..config import SteeringConfig

OPSD_STEERING = dict(pooling="global", strength=0.0, anchor="privileged", distill_on="all",
                     tail_weight=0.0, no_positive="opsd", negative_branch="mean_log")  # no negative pool: the default


def opsd_steering(base: SteeringConfig) -> SteeringConfig:
    """``base`` with the OPSD settings applied."""
    return dataclasses.replace(base, **OPSD_STEERING)
