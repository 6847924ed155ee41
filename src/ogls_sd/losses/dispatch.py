"""Select the loss implementation named by ``loss.impl`` (``reference`` | ``chunked``)."""

from __future__ import annotations

import functools

from . import reference


def get_distill_loss(impl: str, chunk_size: int = 1024):
    """The ``distill_loss`` function of the named implementation (same signature for both)."""
    if impl == "reference":
        return reference.distill_loss
    if impl == "chunked":
        from . import chunked

        return functools.partial(chunked.distill_loss, chunk_size=chunk_size)
    raise ValueError(f"loss.impl: {impl!r} is not one of reference, chunked")


def get_token_logprobs(impl: str, chunk_size: int = 1024):
    """``token_logprobs(hidden, weight, bias, ids, temperature=1.0)`` of the named implementation."""
    if impl == "reference":
        return reference.token_logprobs
    if impl == "chunked":
        from . import chunked

        return functools.partial(chunked.token_logprobs, chunk_size=chunk_size)
    raise ValueError(f"loss.impl: {impl!r} is not one of reference, chunked")
