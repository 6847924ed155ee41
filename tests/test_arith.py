import random

from ogls_sd.tasks.arith import ArithTask


def test_solution_is_correct_column_arithmetic():
    t = ArithTask(digits=3, terms=2)
    assert t.solution([347, 568]) == "7+8=15 4+6+1=11 3+5+1=9 A:915"
    assert t.solution([947, 568]).endswith("A:1515")
    rng = random.Random(0)
    for terms in (2, 3):
        task = ArithTask(digits=3, terms=terms)
        for ex in task.examples(200, seed=1):
            assert task.reward(ex.reference, ex.answer) == 1.0
            assert int(ex.answer) == sum(int(x) for x in ex.problem.split("+"))
            wrong = task.wrong_attempt(ex, rng)
            assert task.reward(wrong, ex.answer) == 0.0


def test_reward_reads_last_answer_only():
    t = ArithTask()
    assert t.reward("A:12 ... A:915", "915") == 1.0
    assert t.reward("A:915 ... A:12", "915") == 0.0
    assert t.reward("no answer", "915") == 0.0


def test_splits_are_seeded_and_disjoint():
    t = ArithTask()
    a = t.examples(300, seed=0, split="train")
    b = t.examples(300, seed=0, split="train")
    test = t.examples(300, seed=0, split="test")
    assert a == b
    assert not {e.problem for e in a} & {e.problem for e in test}
