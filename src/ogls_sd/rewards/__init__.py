"""Rewards: final-answer extraction and verification (see :mod:`ogls_sd.rewards.verifier`), and the
reward functions of ``reward.funcs`` (see :mod:`ogls_sd.rewards.functions`)."""

from .functions import RewardError, RewardSet, reasoning_gym_score, register_reward
from .verifier import (
    REASONS,
    Verifier,
    VerifyResult,
    extract_answer,
    get_default_verifier,
    normalize_answer,
    verify,
    verify_batch,
)

__all__ = [
    "REASONS",
    "RewardError",
    "RewardSet",
    "Verifier",
    "VerifyResult",
    "extract_answer",
    "get_default_verifier",
    "normalize_answer",
    "reasoning_gym_score",
    "register_reward",
    "verify",
    "verify_batch",
]
