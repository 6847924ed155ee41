"""Evaluation metrics over sampled completions (pure functions, no I/O, no model code).

Conventions: for one problem, ``n`` completions were sampled and ``c`` of them are correct.

* :func:`pass_at_k` - unbiased estimator of "at least one of k samples is correct".
* :func:`avg_at_k` - mean per-sample accuracy (a.k.a. mean@k / avg@k), averaged over problems.
* :func:`maj_at_k` - correctness of the majority-voted answer among the first k samples.
* :func:`format_rate` - share of completions with an extractable final answer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

__all__ = ["avg_at_k", "format_rate", "maj_at_k", "majority_answer", "mean_maj_at_k", "mean_pass_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021).

    Computed in the numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which
    never forms the (huge) binomial coefficients. Exactly 1.0 when ``n - c < k`` (every k-subset
    contains a correct sample) and exactly 0.0 when ``c == 0``.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if n < 0 or c < 0 or c > n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct_lists: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct_lists[p]`` are the per-sample outcomes of problem p.

    Raises:
        ValueError: empty input, or a problem with fewer than ``k`` samples.
    """
    if not correct_lists:
        raise ValueError("no problems")
    return sum(pass_at_k(len(cs), sum(bool(x) for x in cs), k) for cs in correct_lists) / len(correct_lists)


def avg_at_k(correct_lists: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (avg@k with k = samples per problem).

    Each problem weighs the same, whatever its number of samples.

    Raises:
        ValueError: no problems, or a problem with no samples.
    """
    if not correct_lists:
        raise ValueError("no problems")
    total = 0.0
    for p, cs in enumerate(correct_lists):
        if len(cs) == 0:
            raise ValueError(f"problem {p} has no samples")
        total += sum(bool(x) for x in cs) / len(cs)
    return total / len(correct_lists)


def majority_answer(
    answers: Sequence[str | None], k: int | None = None, key: Callable[[str], Hashable] | None = None
) -> int | None:
    """Index of the sample whose answer wins the majority vote among the first ``k``, or None.

    ``None`` answers (nothing extracted) do not vote. Answers are grouped by ``key(answer)``
    (default: the string with surrounding whitespace stripped). Ties between equally frequent
    groups are broken deterministically in favour of the group whose first member appears
    earliest; the returned index is that first member.
    """
    k = len(answers) if k is None else k
    if k < 1:
        raise ValueError(f"need k >= 1, got {k}")
    keyf = key or (lambda a: a.strip())
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, a in enumerate(answers[:k]):
        if a is None:
            continue
        g = keyf(a)
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, i)
    if not counts:
        return None
    best = max(counts, key=lambda g: (counts[g], -first[g]))
    return first[best]


def maj_at_k(
    answers: Sequence[str | None],
    corrects: Sequence[bool],
    k: int | None = None,
    key: Callable[[str], Hashable] | None = None,
) -> float:
    """maj@k of one problem: 1.0 if the majority-voted answer among the first ``k`` samples is
    correct, else 0.0 (also 0.0 when no sample has an answer).

    ``answers[i]`` is the extracted answer of sample i (None if none) and ``corrects[i]`` its
    verified outcome. The vote is :func:`majority_answer` (ties -> the answer seen first); the
    voted group's correctness is that of its first member. Pass a ``key`` that canonicalizes
    answers to merge equivalent spellings (e.g. ``"1/2"`` and ``"0.5"``); by default only
    identical strings (after stripping) vote together.

    Raises:
        ValueError: ``answers`` and ``corrects`` differ in length, or ``k`` is out of range.
    """
    if len(answers) != len(corrects):
        raise ValueError(f"{len(answers)} answers but {len(corrects)} outcomes")
    k = len(answers) if k is None else k
    if k < 1 or k > len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got {k}")
    winner = majority_answer(answers, k, key)
    return 0.0 if winner is None else float(bool(corrects[winner]))


def mean_maj_at_k(
    answer_lists: Sequence[Sequence[str | None]],
    correct_lists: Sequence[Sequence[bool]],
    k: int | None = None,
    key: Callable[[str], Hashable] | None = None,
) -> float:
    """:func:`maj_at_k` averaged over problems."""
    if len(answer_lists) != len(correct_lists):
        raise ValueError(f"{len(answer_lists)} answer lists but {len(correct_lists)} outcome lists")
    if not answer_lists:
        raise ValueError("no problems")
    return sum(maj_at_k(a, c, k, key) for a, c in zip(answer_lists, correct_lists)) / len(answer_lists)


def format_rate(extracted: Sequence[str | None]) -> float:
    """Fraction of completions whose final answer could be extracted (not None and not blank).

    Raises:
        ValueError: empty input.
    """
    if len(extracted) == 0:
        raise ValueError("no completions")
    return sum(1 for a in extracted if a is not None and a.strip()) / len(extracted)

