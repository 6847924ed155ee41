"""The ``transformers`` ``generate`` backend (``rollout.backend=hf``): the training model itself
generates, on left-padded prompt ids (no decode / re-encode). Contract: :mod:`.contract`."""

from __future__ import annotations

import torch
from torch import nn

from .contract import Completion, SamplingParams, register_backend


class HFBackend:
    """``transformers`` ``generate`` on left-padded prompt ids (no decode/re-encode)."""

    def __init__(self, model: nn.Module, pad_id: int, eos_id: int, batch_size: int = 64):
        self.model, self.pad_id, self.eos_id, self.batch_size = model, pad_id, eos_id, batch_size

    def sync_weights(self, model: nn.Module | None = None) -> None:
        """No-op: generation uses the training model's own (already updated) weights."""

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel):  # DDP has no .generate
            model = model.module
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
                # synced_gpus=False: transformers turns it on for FSDP-managed models (one all-reduce per
                # token); under train.fsdp the weights are gathered for the whole step (sharding.py), so
                # every process generates on its own, however long, and process 0 alone may evaluate.
                kw = dict(do_sample=not params.greedy, max_new_tokens=params.max_new_tokens,
                          pad_token_id=self.pad_id, eos_token_id=self.eos_id, synced_gpus=False)
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


@register_backend("hf", "transformers generate with the training model itself (CPU or GPU)")
def build_hf(rollout, model: nn.Module, pad_id: int, eos_id: int, **_) -> HFBackend:
    return HFBackend(model, pad_id, eos_id, rollout.batch_size)
