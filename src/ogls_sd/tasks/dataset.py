"""A task over a fixed list of examples (a local file, a hub data set, reasoning-gym, CHAMP).

Answers are graded by the shared verifier (``rewards/verifier.py``: last ``\\boxed{}``, ``####`` or
``Answer:``, math-verify equivalence, hard time limit), the same one ``ogls-sd eval`` uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..data import files
from ..data.example import Example
from ..rewards.verifier import Verifier, get_default_verifier
from .base import Task


@dataclass
class DatasetTask(Task):
    """Examples split once into train / test by a seeded permutation.

    Args:
        examples: all examples.
        test_size: examples held out for ``split="test"`` (the last ones of the permutation).
        max_test_fraction: at most this fraction of the examples (rounded down) is held out
            (``data.eval_fraction_max``); at least one example always stays for training.
        name: a label for logs.
        mode: verifier mode (``math`` or ``exact``).
    """

    all_examples: list[Example]
    test_size: int = 0
    max_test_fraction: float = 1.0
    name: str = "dataset"
    mode: str = "math"
    skipped: int = 0  # bad rows dropped by the loader (data.policy=skip)
    duplicates: int = 0  # rows dropped as repeated problems (data_duplicates in summary.json)
    verifier: Verifier | None = field(default=None, repr=False)
    fingerprint: str = ""  # rows given in memory (Python API data=): their hash, for the warm-start cache key

    def __post_init__(self) -> None:
        if not self.all_examples:
            raise ValueError(f"{self.name}: no examples")
        order = list(range(len(self.all_examples)))
        random.Random(f"{self.name}/split").shuffle(order)
        n_test = min(self.test_size, len(order) - 1, int(self.max_test_fraction * len(order) + 1e-9))
        self._test = [self.all_examples[i] for i in order[len(order) - n_test :]] if n_test > 0 else []
        self._train = [self.all_examples[i] for i in order[: len(order) - n_test]]

    @property
    def split_sizes(self) -> tuple[int, int]:
        """``(training, held out)`` example counts."""
        return len(self._train), len(self._test)

    def split_line(self) -> str:
        """What was split, for the console: ``data: N rows -> X training, Y held out``."""
        n_train, n_test = self.split_sizes
        return f"data: {len(self.all_examples)} rows -> {n_train} training, {n_test} held out"

    def describe(self) -> str:
        return self.split_line()

    def examples(self, n: int, seed: int, split: str = "train") -> list[Example]:
        """``n`` examples. ``test``: the first ``n`` held-out ones (fixed). ``train``: a seeded
        sample without replacement within a call (cycling when ``n`` exceeds the pool)."""
        if split == "test":
            return self._test[:n]
        rng = random.Random(f"{self.name}/{seed}")
        out: list[Example] = []
        while len(out) < n:
            pool = list(self._train)
            rng.shuffle(pool)
            out += pool[: n - len(out)]
        return out

    def reward(self, completion: str, answer: str) -> float:
        v = self.verifier or get_default_verifier()
        return 1.0 if v.verify(completion, answer, mode=self.mode).correct else 0.0

    def rewards(self, completions: list[str], answers: list[str]) -> list[float]:
        v = self.verifier or get_default_verifier()
        return [1.0 if r.correct else 0.0 for r in v.verify_batch(completions, answers, mode=self.mode)]

    def wrong_attempt(self, ex: Example, rng: random.Random) -> str:
        """A wrong attempt for the warm start of the tiny model: another problem's reference."""
        pool = [e for e in self.all_examples if e.answer != ex.answer and e.reference]
        return rng.choice(pool).reference if pool else ""


def split_task(res, source: str, data_cfg) -> DatasetTask:
    """The loaded examples as a task with its held-out split (``data.eval_size``, ``data.eval_fraction_max``)."""
    files.require_examples(res, source)  # none usable: say how many rows were skipped and why
    return DatasetTask(res.examples, test_size=data_cfg.eval_size, max_test_fraction=data_cfg.eval_fraction_max,
                       name=source, skipped=res.skipped, duplicates=res.duplicates)
