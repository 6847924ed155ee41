"""Verifier hardening (issue 12): nested-box hedges, the pre-filter, workers independent of __main__."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ogls_sd.rewards import REASONS, Verifier, extract_answer, normalize_answer

from conftest import VERIFIER_TIMEOUT

TIMEOUT = VERIFIER_TIMEOUT  # the deadline of the shared `verifier` fixture (conftest)
SRC = str(Path(__file__).resolve().parents[1] / "src")




# ------------------------------------------------------------- 10. nested boxes, hedges, empty boxes


@pytest.mark.parametrize(
    "completion",
    [
        r"so \boxed{12 \text{ or } \boxed{13}}",
        r"\boxed{12 \boxed{13}}",
        r"\boxed{\boxed{13}}",
        r"\fbox{12 \boxed{13}}",
        r"\boxed{12 \fbox{13}}",
        r"\boxed{13} first, but finally \boxed{12 \text{ or } \boxed{13}}",  # the last outer box counts
        r"\boxed{12 \boxed{13}} \boxed{} \boxed{ }",
    ],
)
@pytest.mark.parametrize("mode", ["math", "exact"])
def test_a_box_containing_a_box_is_a_hedge_and_never_scores(verifier, completion, mode):
    for gold in ("13", "12"):
        r = verifier.verify(completion, gold, mode=mode)
        assert not r.correct and r.reason == "hedge", (completion, gold, r)
        assert r.extracted is not None and "\\" in r.extracted


def test_extraction_returns_the_outermost_box():
    assert extract_answer(r"\boxed{12 \boxed{13}}") == r"12 \boxed{13}"
    assert extract_answer(r"\boxed{1} then \boxed{a \boxed{b} c} and \boxed{}") == r"a \boxed{b} c"


@pytest.mark.parametrize(
    "completion",
    [
        r"\boxed{12 \lor 13}",
        r"\boxed{12 \vee 13}",
        r"\boxed{12 \wedge 13}",
        r"\boxed{12 \\ 13}",
        r"\boxed{12 | 13}",
        r"\boxed{12 \text{ or } 13}",
        r"\boxed{12 \text{ , } 13}",
        r"\boxed{12, 13}",
        r"The answer is $12 \lor 13$",
    ],
)
def test_a_two_answer_hedge_in_one_box_never_scores(verifier, completion):
    # math-verify must grade the box content as a whole, not fall back to its last number
    for gold in ("13", "12"):
        r = verifier.verify(completion, gold)
        assert not r.correct, (completion, gold, r)


@pytest.mark.parametrize("n_empty", [1, 8, 9, 50, 100_000])
def test_any_number_of_trailing_empty_boxes_is_ignored(verifier, n_empty):
    completion = r"the answer is \boxed{13}" + r" \boxed{}" * n_empty + r" \fbox{ }"
    t0 = time.perf_counter()
    assert extract_answer(completion) == "13"
    assert time.perf_counter() - t0 < 5.0
    r = verifier.verify(completion, "13")
    assert r.correct and r.reason == "ok" and r.extracted == "13"


def test_legitimate_answers_still_verify(verifier):
    cases = [
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{2^{10}}", "1024"),
        (r"\boxed{5!}", "120"),
        (r"\boxed{\binom{5}{2}}", "10"),
        (r"\boxed{x = 13}", "13"),
        (r"\boxed{(-\infty, 1) \cup (2, \infty)}", r"(-\infty,1)\cup(2,\infty)"),
        (r"\boxed{3, 1, 2}", "1, 2, 3"),
        (r"\boxed{\frac{1}{2} \text{ or } 0.5}", "0.5"),  # the same answer twice is not a hedge
    ]
    got = verifier.verify_batch([c for c, _ in cases], [g for _, g in cases])
    assert [(r.correct, r.reason) for r in got] == [(True, "ok")] * len(cases)


# ---------------------------------------------------------------------------- 16. the pre-filter

ADVERSARIAL = [
    r"9^{9^{9^9}}",
    r"9^{9^9}",
    r"9^{9999999}",
    r"10^{10^{10}}",
    r"10^{-10^{10}}",
    r"2^{10^{8}}",
    r"99999999999999999999^{99999999999999999999}",
    "1000000!",
    r"(10^{10})!",
    r"10^{10}!",
    "9!!!!",
    "((9!)!)!",
    r"\binom{10^9}{10^8}",
    r"\Gamma(10^{9})",
    r"\prod_{k=1}^{10^{7}} k",
    r"(x+1)^{1000000}",
    r"(x+1)^{1000}",
    r"e^{10^{9}}",
    r"\frac{" * 30 + "1" + "}{2}" * 30,
    "(" * 200 + "1" + ")" * 200,
    "{" * 20 + "1" + "}" * 20,
    r"\cos(" * 20 + "x" + ")" * 20,
    r"x^{" * 40 + "2" + "}" * 40,
    "9" * 600,
]


def _adversarial_batch(n: int) -> list[str]:
    forms = (r"so \boxed{%s}", "The answer is $%s$", "#### %s")
    return [forms[i % len(forms)] % ADVERSARIAL[i % len(ADVERSARIAL)] for i in range(n)]


def test_adversarial_batch_is_rejected_without_contacting_a_worker():
    deadline = 5.0
    v = Verifier(timeout=deadline, max_workers=2)
    try:
        # one first, so that the old code (no pre-filter) fails after one deadline, not 64
        first = v.verify(_adversarial_batch(1)[0], "5")
        assert first.reason == "too_complex"
        completions = _adversarial_batch(64)
        t0 = time.perf_counter()
        results = v.verify_batch(completions, ["5"] * len(completions))
        elapsed = time.perf_counter() - t0
        assert [r.reason for r in results] == ["too_complex"] * 64
        assert all(not r.correct and r.extracted for r in results)
        assert v.jobs_sent == 0 and v._pool is None  # no worker was ever started
        assert elapsed < 0.25 * 64 * deadline  # generous; in practice a few milliseconds
    finally:
        v.close()


def test_prefilter_lets_normal_items_through(verifier):
    completions = [r"\boxed{9^{9^{9^9}}}", r"\boxed{\frac{2}{4}}", r"\boxed{1000000!}", r"\boxed{2^{2024}}"]
    golds = ["5", "0.5", "5", "2^{2024}"]
    sent = verifier.jobs_sent
    got = [(r.correct, r.reason) for r in verifier.verify_batch(completions, golds)]
    assert got == [(False, "too_complex"), (True, "ok"), (False, "too_complex"), (True, "ok")]
    assert verifier.jobs_sent - sent == 1  # \frac{2}{4} vs 0.5; 2^{2024} is equal as a string


@pytest.mark.parametrize(
    "answer",
    [
        r"2^{2024}", r"10^{100}", "100!", "100000!", r"\binom{100}{50}", r"\frac{1}{\sqrt{2^{\frac{1}{3}}}}",
        r"(x+1)^{10}", r"e^{-x^2}", r"2^{2^{n}}", r"1.5 \times 10^{3}", r"x^{2023}", r"\left(\frac{2}{3}\right)^{2024}",
        r"\left( \frac{\sqrt{3}}{2}, \frac{1}{2} \right)", r"\sum_{k=1}^{n} k", "10!!", "7" * 300, r"2^{2^{2^{2^2}}}",
        r"\frac{1}{1+\frac{1}{1+\frac{1}{1+\frac{1}{2}}}}", r"(-\infty, 1] \cup [2, \infty)", r"10^{-5}",
        r"\frac{(2n)!}{n!(n+1)!}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"(1+\sqrt{2})^{100}",
    ],
)
def test_prefilter_accepts_typical_answers(answer):
    from ogls_sd.rewards.prefilter import reject_reason

    assert reject_reason(normalize_answer(answer)) is None


def test_prefilter_is_fast_on_long_inputs():
    from ogls_sd.rewards.prefilter import reject_reason

    for text in ["^" * 1000, "!" * 1000, "(" * 500 + ")" * 500, "2^" * 500 + "2", "9!" * 500, r"\binom" * 150, "x^{2}" * 200]:
        t0 = time.perf_counter()
        why = reject_reason(text)
        assert time.perf_counter() - t0 < 1.0
        assert why is None or isinstance(why, str)


def test_new_reasons_are_listed():
    assert {"hedge", "too_complex"} <= set(REASONS)


# ------------------------------------------------------------- 17. workers independent of __main__

_SCRIPT = textwrap.dedent(
    r"""
    from ogls_sd.rewards import verify
    r = verify(r"\boxed{\frac{1}{2}}", "0.5")
    print("RESULT", r.correct, r.reason, r.extracted)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _check_output(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True ok \\frac{1}{2}" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    assert "bootstrapping phase" not in proc.stderr and "BrokenProcessPool" not in proc.stderr


def test_verify_from_python_stdin(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-"], input=_SCRIPT, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300
    )
    _check_output(proc)


def test_verify_from_a_script_without_main_guard(tmp_path):
    script = tmp_path / "grade.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300
    )
    _check_output(proc)


def test_workers_are_subprocesses_with_a_memory_cap_and_stop_on_close():
    v = Verifier(timeout=TIMEOUT, max_workers=2, memory_limit_mb=3000)
    try:
        assert v.verify(r"\boxed{\frac{1}{4}}", "0.25").reason == "ok"
        procs = [w.proc for w in v._pool.workers]
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        for p in procs:
            assert p.args[1:3] == ["-m", "ogls_sd.rewards.mv_worker"]
            limits = Path(f"/proc/{p.pid}/limits")
            if limits.exists():
                line = next(x for x in limits.read_text().splitlines() if x.startswith("Max address space"))
                assert str(3000 * 1024 * 1024) in line
    finally:
        v.close()
    for p in procs:
        assert p.wait(timeout=10) is not None


def test_a_killed_worker_is_replaced(verifier):
    assert verifier.verify(r"\boxed{\frac{1}{2}}", "0.5").reason == "ok"
    for w in verifier._pool.workers:
        w.proc.kill()
        w.proc.wait(timeout=10)
    got = verifier.verify_batch([r"\boxed{\frac{3}{4}}", r"\boxed{\frac{1}{3}}"], ["0.75", "0.5"])
    assert [r.reason for r in got] == ["ok", "wrong"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_its_own_workers_and_leaves_the_parents_alone(verifier):
    assert verifier.verify(r"\boxed{\frac{1}{2}}", "0.5").reason == "ok"
    parent_pool = verifier._pool
    parent_procs = [w.proc for w in parent_pool.workers]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            r = verifier.verify(r"\boxed{\frac{3}{4}}", "0.75")
            own = verifier._pool is not parent_pool
            verifier.close()
            parent_pool._finalizer()  # what interpreter exit would run: must not touch the parent's
            os.write(write_fd, f"{r.reason} {own}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        reply = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and reply == "ok True"
    assert all(p.poll() is None for p in parent_procs)
    assert verifier._pool is parent_pool
    assert verifier.verify(r"\boxed{\frac{1}{8}}", "0.125").reason == "ok"
