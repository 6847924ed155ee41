"""The unit of data every task, file loader and benchmark yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One problem.

    Attributes:
        problem: the question shown to the student.
        reference: a worked reference solution (privileged context for the teacher); may be "".
        answer: the verifiable final answer (string form, e.g. "915" or "\\frac{1}{2}").
        id: a stable identifier (file:row, task:seed:index, ...).
    """

    problem: str
    reference: str
    answer: str
    id: str = ""
