"""Rollout backends: prompt ids in, completion ids out.

Contract (every backend): ``generate(prompts, params) -> list[Completion]`` in the order of
``prompts``; ``Completion.ids`` are exactly the sampled tokens, ending with EOS when the model
stopped (``finished``) and never containing padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class Completion:
    ids: list[int]
    finished: bool  # ended with EOS before the generation limit


class HFBackend:
    """``transformers`` ``generate`` on left-padded prompt ids (no decode/re-encode)."""

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int, batch_size: int = 64):
        self.model, self.pad_id, self.eos_id, self.batch_size = model, pad_id, eos_id, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        out: list[Completion] = []
        try:
            for s in range(0, len(prompts), self.batch_size):
                chunk = prompts[s : s + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, width - len(p) :] = torch.tensor(p)
                    att[r, width - len(p) :] = 1
                kw = dict(do_sample=not params.greedy, max_new_tokens=params.max_new_tokens,
                          pad_token_id=self.pad_id, eos_token_id=self.eos_id)
                if not params.greedy:
                    kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)  # 0 disables (HF would otherwise default to 50)
                gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), **kw)
                for row in gen[:, width:].tolist():
                    if self.eos_id in row:
                        row = row[: row.index(self.eos_id) + 1]
                        out.append(Completion(row, True))
                    else:
                        out.append(Completion(row, False))
        finally:
            model.train(was_training)
        return out
