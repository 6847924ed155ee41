"""Rewards: final-answer extraction and verification (see :mod:`ogls_sd.rewards.verifier`)."""

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
    "Verifier",
    "VerifyResult",
    "extract_answer",
    "get_default_verifier",
    "normalize_answer",
    "verify",
    "verify_batch",
]
