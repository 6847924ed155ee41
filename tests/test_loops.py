"""The repetition-loop metric (docs/metrics.md `completion/loop_frac`)."""

from types import SimpleNamespace

from ogls_sd.markers import is_repetition_loop, loop_fraction


def test_loop_rule():
    loop = [5, 6, 7] + [1, 2, 3] * 6  # a 3-gram repeated 6 times at the end
    assert is_repetition_loop(loop, finished=False)
    assert not is_repetition_loop(loop, finished=True)  # ended with EOS: never a loop
    assert is_repetition_loop([9] * 13, finished=False)  # one token repeated past the minimum span
    assert not is_repetition_loop([9] * 12, finished=False)  # too short to call
    varied = list(range(40))
    assert not is_repetition_loop(varied, finished=False)  # truncated but not repeating
    almost = [1, 2, 3] * 6 + [4]  # the repetition was broken at the end
    assert not is_repetition_loop(almost, finished=False)
    long_period = list(range(16)) * 4  # a 16-gram, 4 copies
    assert is_repetition_loop(long_period, finished=False)
    assert not is_repetition_loop(list(range(17)) * 4, finished=False)  # period above the limit


def test_loop_fraction():
    rs = [SimpleNamespace(ids=[1, 2] * 10, finished=False), SimpleNamespace(ids=[1, 2] * 10, finished=True),
          SimpleNamespace(ids=list(range(20)), finished=False), SimpleNamespace(ids=[], finished=False)]
    assert loop_fraction(rs) == 0.25
    assert loop_fraction([]) == 0.0
