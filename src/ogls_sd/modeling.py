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


SHRINK, SLACK = 0.75, 8  # a pass's rows are at least 3/4 as long as its longest, or at most 8 tokens shorter


def _runs(items: list[int], length, max_tokens: int, extra: int = 0, similar: bool = True) -> list[list[int]]:
    """``items`` (sorted longest first) in passes: a pass ends before an item that would make
    ``rows × (extra + longest)`` exceed ``max_tokens`` or (``similar``) that is shorter than
    ``SHRINK`` × and ``SLACK`` tokens below the pass's longest (bounding the padding); one item at least."""
    out: list[list[int]] = []
    for i in items:
        cur = out[-1] if out else None
        if cur is not None:
            top = length(cur[0])
            fits = (len(cur) + 1) * (extra + top) <= max_tokens
            alike = not similar or length(i) >= SHRINK * top or top - length(i) <= SLACK
            if fits and alike:
                cur.append(i)
                continue
        out.append([i])
    return out


def _cache_kwarg(backbone: nn.Module) -> str:
    """transformers 5 calls the cache ``cache`` (``past_key_values`` before, still accepted until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@dataclass
class _PrefixCache:
    """Keys / values ``[prefixes, kv heads, width, head dim]`` per layer, right-padded to the
    longest prefix, and the mask of the real positions ``[prefixes, width]``."""

    layers: list[tuple[Tensor, Tensor]]
    mask: Tensor


def _encode_prefixes(backbone: nn.Module, prefixes: list[list[int]], pad_id: int, max_tokens: int, dev) -> _PrefixCache:
    """Key/value cache of ``prefixes`` (longest first), encoded in passes of similar lengths and
    padded along the sequence to the longest (padded positions are masked out of every use)."""
    kw, width = _cache_kwarg(backbone), len(prefixes[0])
    parts, masks = [], []
    for run in _runs(list(range(len(prefixes))), lambda p: len(prefixes[p]), max_tokens):
        ids, att = _padded([prefixes[p] for p in run], pad_id)
        cache = getattr(backbone(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=True), kw)
        pad = width - ids.shape[1]
        parts.append([(nn.functional.pad(ly.keys, (0, 0, 0, pad)), nn.functional.pad(ly.values, (0, 0, 0, pad)))
                      for ly in cache.layers])
        masks.append(nn.functional.pad(att, (0, pad)))
    layers = [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]
    return _PrefixCache(layers, torch.cat(masks).to(dev))


def _suffix_pass(backbone: nn.Module, pc: _PrefixCache, rows: list[int], suffixes: list[list[int]], pad_id: int, dev) -> Tensor:
    """``suffixes`` on top of prefix ``rows[k]`` of ``pc`` (its cache gathered along the batch):
    padding inside the cache is masked, positions continue each row's own prefix. ``[rows, width, H]``."""
    from transformers import DynamicCache

    idx = torch.tensor(rows, device=dev)
    layers = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in pc.layers]
    ids, att = _padded(suffixes, pad_id)
    pre = pc.mask.index_select(0, idx)
    pos = pre.sum(1, keepdim=True) + torch.arange(ids.shape[1], device=dev)[None, :]
    out = backbone(input_ids=ids.to(dev), attention_mask=torch.cat([pre, att.to(dev)], 1), position_ids=pos,
                   use_cache=True, **{_cache_kwarg(backbone): DynamicCache(ddp_cache_data=layers)})
    return out.last_hidden_state


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
    completion's first predicting position) encoded once and its key/value cache reused for every
    sequence that continues it. Prefixes are cached in chunks of at most ``max_tokens`` tokens;
    every pass holds at most ``max_tokens`` cached + new tokens (one sequence at least), and passes
    group similar lengths. Equal to :func:`completion_hidden` up to float rounding; sequences
    without a prefix token go through it."""
    backbone = unwrap(model).get_decoder()
    dev = next(model.parameters()).device
    keep = [i for i in range(len(batch.seqs)) if batch.lengths[i] > 0]
    plain = [i for i in keep if batch.starts[i] < 2]
    parts: dict[int, Tensor] = {}
    if plain:
        sub = SeqBatch([batch.seqs[i] for i in plain], [batch.starts[i] for i in plain], [batch.lengths[i] for i in plain])
        h = completion_hidden(model, sub, pad_id)
        for i, a in zip(plain, row_offsets(sub.lengths)):
            parts[i] = h[a : a + batch.lengths[i]]
    g = _group_by_prefix(batch, [i for i in keep if batch.starts[i] >= 2])
    by_len = sorted(range(len(g.prefixes)), key=lambda p: -len(g.prefixes[p]))
    for chunk in _runs(by_len, lambda p: len(g.prefixes[p]), max_tokens, similar=False):
        pc = _encode_prefixes(backbone, [g.prefixes[p] for p in chunk], pad_id, max_tokens, dev)
        slot = {p: k for k, p in enumerate(chunk)}
        members = sorted((r for r in range(len(g.owner)) if g.owner[r] in slot), key=lambda r: -len(g.suffixes[r]))
        width = len(g.prefixes[chunk[0]])
        for sub in _runs(members, lambda r: len(g.suffixes[r]), max_tokens, extra=width):
            h = _suffix_pass(backbone, pc, [slot[g.owner[r]] for r in sub], [g.suffixes[r] for r in sub], pad_id, dev)
            for k, r in enumerate(sub):
                parts[g.seq[r]] = h[k, : len(g.suffixes[r])]
    if not parts:
        return torch.zeros(0, unwrap(model).config.hidden_size, device=dev)
    return torch.cat([parts[i] for i in keep], 0)


def row_offsets(lengths: list[int]) -> list[int]:
    """Where each of the rows of the given lengths starts in their concatenation."""
    out, acc = [], 0
    for n in lengths:
        out.append(acc)
        acc += n
    return out
