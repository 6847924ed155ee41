"""The unit of data every task, file loader and benchmark yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One problem.

    Attributes:
        problem: the question shown to the student.
        reference: a worked reference solution (privileged context for the teacher); may be "".
        answer: the verifiable final answer (string form, e.g. "915" or "\\frac{1}{2}").
        id: a stable identifier (file:row, task:seed:index, ...).
        extra: the source's other columns (a data file's or data set's unmapped columns, a
            reasoning-gym entry and its metadata), passed to reward functions (``reward.funcs``) by
            name. Not part of equality or hashing: two examples with the same fields are the same
            problem whatever else their rows held.
    """

    problem: str
    reference: str
    answer: str
    id: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
