"""Pure tensor math of the losses: divergences, the steered target, reference and chunked paths."""

from .chunked import (
    auto_chunk_size,
    distill_loss as chunked_distill_loss,
    get_distill_loss,
    get_token_logprobs,
    token_logprobs as chunked_token_logprobs,
)
from .divergence import DivergenceSpec, divergence_rows
from .reference import DistillOutput, distill_loss as reference_distill_loss, token_logprobs
from .target import TeacherTarget, mean_log_softmax, steered_logits

__all__ = [
    "DivergenceSpec",
    "DistillOutput",
    "TeacherTarget",
    "auto_chunk_size",
    "chunked_distill_loss",
    "chunked_token_logprobs",
    "divergence_rows",
    "get_distill_loss",
    "get_token_logprobs",
    "mean_log_softmax",
    "reference_distill_loss",
    "steered_logits",
    "token_logprobs",
]
