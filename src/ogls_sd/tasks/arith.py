"""Built-in task ``arith``: column addition with a short chain of thought.

A problem is ``a+b(+c...)`` with ``digits``-digit operands. The reference solution works column by
column from the right, one step per column (digits, carry in, column sum), then the answer::

    347+568  ->  7+8=15 4+6+1=11 3+5+1=9 A:915

Completions are graded by the integer after the last ``A:``. The task also writes plausible wrong
attempts (a carry slip, a column sum off by one, a mis-assembled answer digit) for the warm start of
the context-pooling template.

Style ``templated`` (``data.arith_style``; see ``docs/experiments.md``): the REFERENCE solution
follows every step with a check segment the student never uses (``TEMPLATE_MARKER``)::

    347+568  ->  7+8=15 chk:15-8=7 ok 4+6+1=11 chk:11-6-1=4 ok 3+5+1=9 chk:9-5-1=3 ok A:915

while the student's own format (:meth:`ArithTask.plain_reference`, wrong attempts, what the warm
start teaches for the student prompt) stays plain. A rollout limit of :meth:`ArithTask.plain_max_tokens`
then cuts off any completion that copies the template (reward 0).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..data.example import Example
from .base import Task, register_task

STYLES = ("plain", "templated")
TEMPLATE_MARKER = "chk:"  # the check segment of templated references; counted as markers/template

ANSWER_RE = re.compile(r"A:(-?\d{1,40})")

# Compact templates for the char-level model (each character is a token).
TEMPLATES = {
    "student": "{problem}",
    "teacher": "{problem}\nRef:{reference}",
    "context": "{problem}\nTry:{attempt}",
    "answer_format": "",
}


@dataclass(frozen=True)
class ArithExample(Example):
    """An arith example that also carries its solution in the student's own (plain) style.

    ``reference`` is the privileged reference (templated under ``arith_style=templated``);
    ``plain_reference`` is the same solution without the check segments (equal to ``reference``
    under ``plain``). ``steering.fallback_reference=plain`` reads it for the all-wrong fallback.
    """

    plain_reference: str = ""


def templated_solution(plain: str) -> str:
    """Insert a check segment after every step of a plain solution (``a+b+c=s`` -> ``chk:s-b-c=a ok``)."""
    body, _, ans = plain.rpartition(" A:")
    out = []
    for step in body.split(" "):
        lhs, s = step.split("=")
        terms = lhs.split("+")
        out.append(f"{step} {TEMPLATE_MARKER}{s}-{'-'.join(terms[1:])}={terms[0]} ok")
    return " ".join(out) + f" A:{ans}"


@dataclass
class ArithTask(Task):
    """Seeded generator of addition problems with worked solutions.

    Args:
        digits: digits per operand (leading digit non-zero).
        terms: number of operands.
        style: ``plain`` (reference in the student's own style) or ``templated`` (the reference
            carries a check segment after every step; the student format stays plain).
    """

    digits: int = 3
    terms: int = 2
    name: str = "arith"
    style: str = "plain"
    template_marker: str = TEMPLATE_MARKER

    def __post_init__(self) -> None:
        if self.digits < 1 or self.terms < 2:
            raise ValueError("arith needs digits >= 1 and terms >= 2")
        if self.style not in STYLES:
            raise ValueError(f"data.arith_style: {self.style!r} is not one of {', '.join(STYLES)}")

    # ------------------------------------------------------------------ generation
    def sample_operands(self, rng: random.Random) -> list[int]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        return [rng.randint(lo, hi) for _ in range(self.terms)]

    @staticmethod
    def solution(operands: list[int], drop_carry_at: int | None = None, add_carry_at: int | None = None,
                 slip_at: int | None = None, slip: int = 1) -> str:
        """The column-by-column solution; optionally with one slip (for wrong attempts): a carry
        dropped or invented at a column, or a column sum off by ``slip`` at ``slip_at`` (the wrong
        sum is then carried on consistently, as a student would)."""
        width = max(len(str(x)) for x in operands)
        digits = [[int(c) for c in str(x).zfill(width)[::-1]] for x in operands]
        steps, out_digits, carry = [], [], 0
        for col in range(width):
            if drop_carry_at == col:
                carry = 0
            if add_carry_at == col:
                carry += 1
            col_digits = [d[col] for d in digits]
            s = sum(col_digits) + carry
            if slip_at == col:
                s = max(0, s + slip)
            lhs = "+".join(str(d) for d in col_digits) + (f"+{carry}" if carry else "")
            steps.append(f"{lhs}={s}")
            out_digits.append(s % 10)
            carry = s // 10
        value = int(str(carry) + "".join(str(d) for d in reversed(out_digits))) if carry else int(
            "".join(str(d) for d in reversed(out_digits))
        )
        return " ".join(steps) + f" A:{value}"

    def make(self, operands: list[int], idx: str = "") -> ArithExample:
        problem = "+".join(str(x) for x in operands)
        plain = self.solution(operands)
        ref = templated_solution(plain) if self.style == "templated" else plain
        return ArithExample(problem=problem, reference=ref, answer=str(sum(operands)), id=idx, plain_reference=plain)

    def templates(self) -> dict:
        """The compact templates of the char-level model (:data:`TEMPLATES`)."""
        return TEMPLATES

    def plain_reference(self, ex: Example) -> str:
        """The solution of ``ex`` in the student's own (plain) style, whatever ``style`` is."""
        p = getattr(ex, "plain_reference", "")
        return p or self.solution([int(x) for x in ex.problem.split("+")])

    def plain_max_tokens(self) -> int:
        """Characters (= tokens of the char-level model) of the longest plain solution, plus EOS."""
        top = [10**self.digits - 1] * self.terms
        return len(self.solution(top)) + 1

    def examples(self, n: int, seed: int, split: str = "train") -> list[Example]:
        """``n`` problems from the stream ``(seed, split)``; ``train`` and ``test`` never overlap."""
        rng = random.Random(f"arith/{self.digits}/{self.terms}/{seed}/{split}")
        out = []
        while len(out) < n:
            ops = self.sample_operands(rng)
            # Disjoint splits: a problem belongs to the split chosen by a hash of its operands.
            in_test = random.Random("+".join(map(str, ops))).random() < 0.2
            if in_test == (split == "test"):
                out.append(self.make(ops, f"arith:{split}:{seed}:{len(out)}"))
        return out

    def wrong_attempt(self, ex: Example, rng: random.Random) -> str:
        """A plausible wrong solution in the student's style, with one slip of the kinds a small
        model makes: a carry dropped or invented, a column sum off by one (carried on
        consistently), or correct steps with one answer digit mis-assembled. Always wrong."""
        ops = [int(x) for x in ex.problem.split("+")]
        width = max(len(str(x)) for x in ops)
        for _ in range(8):
            col, kind = rng.randrange(width), rng.random()
            if kind < 0.3:
                sol = self.solution(ops, drop_carry_at=col)
            elif kind < 0.55:
                sol = self.solution(ops, add_carry_at=col)
            elif kind < 0.85:
                sol = self.solution(ops, slip_at=col, slip=rng.choice([-1, 1]))
            else:  # steps right, one digit of the answer wrong
                right = self.solution(ops)
                body, _, ans = right.rpartition("A:")
                pos = rng.randrange(len(ans))
                digit = str((int(ans[pos]) + rng.choice([1, 9])) % 10)
                wrong = ans[:pos] + digit + ans[pos + 1 :]
                sol = body + "A:" + (wrong.lstrip("0") or "0")
            if self.extract(sol) != ex.answer:
                return sol
        wrong = str(int(ex.answer) + rng.choice([-10, -1, 1, 10]))
        return self.solution(ops).rsplit("A:", 1)[0] + f"A:{wrong}"

    # ------------------------------------------------------------------ grading
    @staticmethod
    def extract(text: str) -> str | None:
        m = ANSWER_RE.findall(text[-4096:])
        return str(int(m[-1])) if m else None

    def reward(self, completion: str, answer: str) -> float:
        """1.0 when the integer after the last ``A:`` equals the answer, else 0.0."""
        got = self.extract(completion)
        return 1.0 if got is not None and got == str(int(answer)) else 0.0


@register_task("arith", "built-in generator of column additions with a worked solution (data.arith_*)", mixable=False)
def build_arith(data_cfg, argument: str) -> ArithTask:
    return ArithTask(digits=data_cfg.arith_digits, terms=data_cfg.arith_terms, style=getattr(data_cfg, "arith_style", "plain"))
