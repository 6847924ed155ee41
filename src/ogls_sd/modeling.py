"""Model access: backbone hidden states at completion positions, and the lm head.

The losses never need full-vocabulary logits from the model: every forward pass here runs the
backbone only (``model.get_decoder()``) and returns final hidden states of the positions that
predict completion tokens. The lm head is applied by the loss code (reference or chunked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under peft / accelerate wrappers."""
    m = model
    for _ in range(4):
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        elif hasattr(m, "module") and isinstance(getattr(m, "module"), nn.Module):
            m = m.module
        else:
            break
    return m


def lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] | None)`` of the output embedding."""
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@dataclass
class SeqBatch:
    """Sequences ``prompt + completion`` and where their completions start.

    ``seqs[i][starts[i]:]`` is completion ``i``; only its first ``lengths[i]`` tokens are kept.
    """

    seqs: list[list[int]]
    starts: list[int]
    lengths: list[int]

    @property
    def rows(self) -> int:
        return sum(self.lengths)


def completion_hidden(model: nn.Module, batch: SeqBatch, pad_id: int, micro_batch: int = 64) -> Tensor:
    """Final hidden states at the positions predicting the kept completion tokens.

    Sequences are right-padded (padding only after the completion, so positions are unaffected).
    Position ``starts[i] - 1 + j`` predicts completion token ``j``.

    Returns:
        ``[sum(lengths), H]``, rows ordered by sequence then position.
    """
    backbone = unwrap(model).get_decoder()
    dev = next(model.parameters()).device
    out = []
    order = range(len(batch.seqs))
    for s in range(0, len(batch.seqs), micro_batch):
        idx = list(order[s : s + micro_batch])
        need = [batch.starts[i] + batch.lengths[i] for i in idx]  # tokens up to the last kept one
        width = max(need)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = batch.seqs[i][: need[r]]
            ids[r, : len(seq)] = torch.tensor(seq)
            att[r, : len(seq)] = 1
        h = backbone(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False).last_hidden_state
        for r, i in enumerate(idx):
            a = batch.starts[i] - 1
            out.append(h[r, a : a + batch.lengths[i]])
    if not out:
        H = unwrap(model).config.hidden_size
        return torch.zeros(0, H, device=dev)
    return torch.cat(out, 0)
