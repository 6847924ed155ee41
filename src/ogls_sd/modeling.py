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


# ---------------------------------------------------------------------- prefix-shared passes
@dataclass
class _Shared:
    """Sequences grouped by the prefix they share: ``prefixes[p]`` is encoded once; member ``r``
    scores ``suffixes[r]`` (the prefix's last token + the kept completion but its last token) on
    top of prefix ``owner[r]``, for sequence ``seq[r]`` of the batch."""

    prefixes: list[list[int]]
    owner: list[int]
    suffixes: list[list[int]]
    seq: list[int]


def _group_by_prefix(batch: SeqBatch, idx: list[int]) -> _Shared:
    """Position ``starts[i] - 1`` predicts completion token 0, so the cached prefix stops one token
    before the completion and each suffix is ``seq[starts - 1 : starts - 1 + length]``."""
    where: dict[tuple[int, ...], int] = {}
    g = _Shared([], [], [], [])
    for i in idx:
        cut = batch.starts[i] - 1
        key = tuple(batch.seqs[i][:cut])
        if key not in where:
            where[key] = len(g.prefixes)
            g.prefixes.append(list(key))
        g.owner.append(where[key])
        g.suffixes.append(batch.seqs[i][cut : cut + batch.lengths[i]])
        g.seq.append(i)
    return g


def _padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and attention mask ``[len(rows), max len]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        att[k, : len(r)] = 1
    return ids, att


def _chunks_by_cost(g: _Shared, max_tokens: int) -> list[list[int]]:
    """Members (indices into ``g.owner``) in passes of at most ``max_tokens`` cached + new tokens
    (``rows × (widest prefix + widest suffix)``; one member at least). Members of one prefix are
    contiguous in a pass, so a pass encodes few prefixes."""
    order = sorted(range(len(g.owner)), key=lambda r: g.owner[r])
    out: list[list[int]] = []
    cur: list[int] = []
    wp = ws = 0
    for r in order:
        p, s = max(wp, len(g.prefixes[g.owner[r]])), max(ws, len(g.suffixes[r]))
        if cur and (len(cur) + 1) * (p + s) > max_tokens:
            out.append(cur)
            cur, p, s = [], len(g.prefixes[g.owner[r]]), len(g.suffixes[r])
        cur.append(r)
        wp, ws = p, s
    return out + [cur] if cur else out


def _cache_kwarg(backbone: nn.Module) -> str:
    """transformers 5 calls the cache ``cache`` (``past_key_values`` before, still accepted until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _shared_pass(backbone: nn.Module, g: _Shared, members: list[int], pad_id: int, dev) -> Tensor:
    """One pass: the distinct prefixes of ``members`` encoded once (right-padded), their key/value
    cache gathered along the batch for every member, then the members' suffixes on top of it.
    Padding inside the cache is masked; suffix positions continue each row's own prefix. Returns
    the suffix hidden states ``[len(members), widest suffix, H]``."""
    from transformers import DynamicCache

    used = sorted({g.owner[r] for r in members})
    pre_ids, pre_att = _padded([g.prefixes[p] for p in used], pad_id)
    kw = _cache_kwarg(backbone)
    out = backbone(input_ids=pre_ids.to(dev), attention_mask=pre_att.to(dev), use_cache=True)
    cache = getattr(out, kw)
    rows = torch.tensor([used.index(g.owner[r]) for r in members], device=dev)
    layers = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers]
    suf_ids, suf_att = _padded([g.suffixes[r] for r in members], pad_id)
    plen = pre_att.sum(1).to(dev).index_select(0, rows)
    pos = plen[:, None] + torch.arange(suf_ids.shape[1], device=dev)[None, :]
    att = torch.cat([pre_att.to(dev).index_select(0, rows), suf_att.to(dev)], 1)
    h = backbone(input_ids=suf_ids.to(dev), attention_mask=att, position_ids=pos,
                 use_cache=True, **{kw: DynamicCache(ddp_cache_data=layers)}).last_hidden_state
    return h


def repeats_a_prefix(batch: SeqBatch) -> bool:
    """Two sequences of ``batch`` share the prefix before their completion's first predicting position."""
    keys = [tuple(s[: st - 1]) for s, st, n in zip(batch.seqs, batch.starts, batch.lengths) if n > 0 and st >= 2]
    return len(set(keys)) < len(keys)


def can_share_prefixes(model: nn.Module) -> bool:
    """Whether :func:`prefix_shared_hidden` applies: full attention in every layer (a sliding window
    would drop cached tokens) and a backbone that takes a key/value cache."""
    cfg = unwrap(model).config
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types) and not getattr(cfg, "use_sliding_window", False)


def prefix_shared_hidden(model: nn.Module, batch: SeqBatch, pad_id: int, max_tokens: int) -> Tensor:
    """:func:`completion_hidden` (no grad) with each distinct prefix (everything before the
    completion's first predicting position) encoded once per pass and its key/value cache reused
    for every sequence that continues it. A pass holds at most ``max_tokens`` cached + new tokens.
    Equal to :func:`completion_hidden` up to float rounding; sequences without a prefix token go
    through it."""
    backbone = unwrap(model).get_decoder()
    dev = next(model.parameters()).device
    keep = [i for i in range(len(batch.seqs)) if batch.lengths[i] > 0]
    plain = [i for i in keep if batch.starts[i] < 2]
    parts: dict[int, Tensor] = {}
    if plain:
        sub = SeqBatch([batch.seqs[i] for i in plain], [batch.starts[i] for i in plain], [batch.lengths[i] for i in plain])
        h = completion_hidden(model, sub, pad_id)
        for i, a in zip(plain, _row_offsets(sub.lengths)):
            parts[i] = h[a : a + batch.lengths[i]]
    g = _group_by_prefix(batch, [i for i in keep if batch.starts[i] >= 2])
    for members in _chunks_by_cost(g, max_tokens):
        h = _shared_pass(backbone, g, members, pad_id, dev)
        for k, r in enumerate(members):
            parts[g.seq[r]] = h[k, : len(g.suffixes[r])]
    if not parts:
        return torch.zeros(0, unwrap(model).config.hidden_size, device=dev)
    return torch.cat([parts[i] for i in keep], 0)


def _row_offsets(lengths: list[int]) -> list[int]:
    out, acc = [], 0
    for n in lengths:
        out.append(acc)
        acc += n
    return out
