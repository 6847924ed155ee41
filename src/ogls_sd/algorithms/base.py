"""What every algorithm sees: the rollouts of one step, grouped by prompt, and its tools."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.example import Example


@dataclass
class Rollout:
    """One sampled completion. ``ids`` are the exact sampled tokens (EOS included if ``finished``)."""

    group: int
    ids: list[int]
    finished: bool
    reward: float = 0.0

    @property
    def correct(self) -> bool:
        return self.reward > 0.5


@dataclass
class Group:
    """A prompt and its G rollouts. ``student_prompt``/``teacher_prompt`` are token ids."""

    example: Example
    student_prompt: list[int]
    teacher_prompt: list[int]
    rollouts: list[int] = field(default_factory=list)  # indices into the step's rollout list


@dataclass
class StepBatch:
    groups: list[Group]
    rollouts: list[Rollout]

    def pools(self, g: int) -> tuple[list[int], list[int]]:
        """``(P, N)``: indices of correct and incorrect rollouts of group ``g``."""
        idx = self.groups[g].rollouts
        return [i for i in idx if self.rollouts[i].correct], [i for i in idx if not self.rollouts[i].correct]
