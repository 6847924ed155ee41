"""pass@k / avg@k / maj@k / format rate."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ogls_sd.eval_metrics import (
    avg_at_k,
    format_rate,
    maj_at_k,
    majority_answer,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_and_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: the product form stays accurate where binomials would overflow floats
    n, c, k = 2000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (-1, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_a_probability_monotone_in_k_and_c(nck):
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p - 1e-12


def test_mean_pass_at_k():
    assert mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    assert mean_pass_at_k([[True, False], [False, True]], 2) == 1.0
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
    with pytest.raises(ValueError):
        mean_pass_at_k([[True]], 2)


def test_avg_at_k():
    assert avg_at_k([[True, False, True, True], [False, False, False, False]]) == pytest.approx(0.375)
    assert avg_at_k([[True], [False, True]]) == pytest.approx(0.75)  # each problem weighs the same
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def test_maj_at_k_majority_and_ties():
    answers = ["3", "4", "4", None, "3", "4"]
    corrects = [False, True, True, False, False, True]
    assert maj_at_k(answers, corrects) == 1.0  # "4" x3 beats "3" x2
    assert maj_at_k(answers, corrects, k=1) == 0.0  # only "3"
    # first 5: "3" x2 vs "4" x2 -> tie -> the answer seen first ("3") wins
    assert majority_answer(answers, k=5) == 0
    assert maj_at_k(answers, corrects, k=5) == 0.0
    # tie broken the other way when "4" comes first
    assert maj_at_k(["4", "3", "3", "4"], [True, False, False, True]) == 1.0


def test_maj_at_k_none_and_key():
    assert maj_at_k([None, None], [False, False]) == 0.0
    assert majority_answer([None]) is None
    assert maj_at_k([" 5", "5 ", "6"], [True, True, False]) == 1.0  # default key strips whitespace
    canon = {"1/2": "0.5", "0.5": "0.5"}
    ans = ["1/2", "0.5", "2", "2"]
    ok = [True, True, False, False]
    assert majority_answer(ans) == 2  # "2" has 2 votes, "1/2" and "0.5" one each
    assert maj_at_k(ans, ok) == 0.0
    # merged by the key, "0.5" (2 votes, first at index 0) ties with "2" (2 votes) and is seen first
    assert majority_answer(ans, key=lambda a: canon.get(a, a)) == 0
    assert maj_at_k(ans, ok, key=lambda a: canon.get(a, a)) == 1.0


def test_maj_at_k_bad_arguments():
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False])
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], k=2)
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], k=0)


def test_mean_maj_at_k():
    assert mean_maj_at_k([["1", "1", "2"], ["3", "4", "4"]], [[True, True, False], [True, False, False]]) == 0.5
    with pytest.raises(ValueError):
        mean_maj_at_k([], [])


def test_format_rate():
    assert format_rate(["1", None, "  ", "x"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        format_rate([])
