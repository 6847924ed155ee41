"""A mixture of data sources (``data.mixture``): training prompts drawn from several data sets with
sampling weights; each source keeps its own held-out split.

Entries are ``SOURCE=WEIGHT`` (the last ``=`` separates them; a source is anything ``data.task``
accepts except ``arith``: a file, a hub id, ``reasoning_gym:<task>``, ``champ``). Every source is a
:class:`~ogls_sd.tasks.dataset.DatasetTask` loaded with the ``data.*`` column settings and split on
its own (``data.eval_size`` per source, capped by ``data.eval_fraction_max``), so no problem is both
trained on and held out; a problem that several sources hold is kept in the first of them only
(:func:`without_earlier_problems`, counted in ``data_duplicates``). A step's ``n`` training prompts: each slot picks a source with probability
proportional to its weight (a seeded draw, a function of the step's seed only, so a resumed run sees
the same prompts), then takes the next example of that source's own seeded stream. The held-out set
is the sources' held-out sets in order.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass

from ..data.example import Example
from ..data.files import normalise_problem
from .base import Task, source_error, task_spec
from .dataset import DatasetTask


def _source_key(src: str) -> str:
    """What "the same source" means: a local path by its real path (``a.jsonl`` and
    ``dir/../a.jsonl`` are one file), anything else by its name."""
    return os.path.realpath(src) if os.path.exists(src) else src


def without_earlier_problems(sources: list[DatasetTask]) -> list[DatasetTask]:
    """Drop from each source the rows whose problem (normalised text) an earlier source already
    has, and re-split it: a problem then lives in one source only, so it is never trained on in
    one source and held out in another. The dropped rows are counted in ``duplicates``."""
    seen: set[str] = set()
    out = []
    for s in sources:
        keys = [normalise_problem(ex.problem) for ex in s.all_examples]
        keep = [ex for ex, k in zip(s.all_examples, keys) if k not in seen]
        seen.update(keys)
        dropped = len(s.all_examples) - len(keep)
        if dropped and not keep:
            raise ValueError(f"data.mixture: every problem of {s.name} repeats one of an earlier source")
        out.append(dataclasses.replace(s, all_examples=keep, duplicates=s.duplicates + dropped) if dropped else s)
    return out


def parse_mixture(entries: list[str]) -> list[tuple[str, float]]:
    """``["a.jsonl=0.7", "reasoning_gym:gsm_symbolic=0.3"]`` -> ``[(source, weight), ...]``."""
    out = []
    for e in entries:
        src, sep, w = str(e).rpartition("=")
        if not sep or not src.strip():
            raise ValueError(f"data.mixture: entry {e!r} must be SOURCE=WEIGHT (e.g. data/train.jsonl=0.7)")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"data.mixture: entry {e!r}: weight {w!r} is not a number") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"data.mixture: entry {e!r}: weight must be > 0 and finite")
        found = task_spec(src.strip())
        if found is not None and not found[0].mixable:
            name = found[0].name
            raise ValueError(f"data.mixture: {name!r} (the built-in generator) cannot be mixed; use data.task={name} alone")
        bad = source_error(src.strip(), key=f"data.mixture: entry {e!r}")
        if bad:
            raise ValueError(bad)
        out.append((src.strip(), weight))
    keys = [_source_key(s) for s, _ in out]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise ValueError(f"data.mixture: {out[i][0]!r} is listed twice (the same source as "
                             f"{out[keys.index(k)][0]!r})")
    return out


@dataclass
class MixtureTask(Task):
    """Several :class:`DatasetTask` sources with sampling weights (see the module docstring)."""

    sources: list[DatasetTask]
    weights: list[float]

    def __post_init__(self) -> None:
        self.sources = without_earlier_problems(self.sources)
        total = sum(self.weights)
        self.probs = [w / total for w in self.weights]
        self.name = "+".join(s.name for s in self.sources)
        self.skipped = sum(s.skipped for s in self.sources)
        self.duplicates = sum(s.duplicates for s in self.sources)
        self.mode = self.sources[0].mode
        self.verifier = self.sources[0].verifier

    @property
    def split_sizes(self) -> tuple[int, int]:
        return sum(s.split_sizes[0] for s in self.sources), sum(s.split_sizes[1] for s in self.sources)

    def split_line(self) -> str:
        parts = [f"{s.name} ({p:.0%}): {len(s.all_examples)} rows -> {s.split_sizes[0]} training, {s.split_sizes[1]} held out"
                 for s, p in zip(self.sources, self.probs)]
        return "data mixture: " + "; ".join(parts)

    def describe(self) -> str:
        return self.split_line()

    def examples(self, n: int, seed: int, split: str = "train") -> list[Example]:
        if split == "test":
            out: list[Example] = []
            for s in self.sources:
                out += s.examples(n, seed, split="test")
            return out[:n]
        rng = random.Random(f"mixture/{seed}")
        picks = rng.choices(range(len(self.sources)), weights=self.probs, k=n)
        streams = [iter(s.examples(picks.count(i), seed, split="train")) for i, s in enumerate(self.sources)]
        return [next(streams[i]) for i in picks]

    def reward(self, completion: str, answer: str) -> float:
        return self.sources[0].reward(completion, answer)

    def rewards(self, completions: list[str], answers: list[str]) -> list[float]:
        return self.sources[0].rewards(completions, answers)

    def wrong_attempt(self, ex: Example, rng: random.Random) -> str:
        return self.sources[0].wrong_attempt(ex, rng)
