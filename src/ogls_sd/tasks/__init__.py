"""Tasks: seeded problem generators with a reward (``reward(completion, answer) -> float``)."""

from __future__ import annotations

from .arith import TEMPLATES as ARITH_TEMPLATES
from .arith import ArithTask


def get_task(data_cfg):
    """The task named by ``data.task``."""
    if data_cfg.task == "arith":
        return ArithTask(digits=data_cfg.arith_digits, terms=data_cfg.arith_terms)
    raise ValueError(f"data.task: unknown task {data_cfg.task!r} (built-in: arith)")


def task_templates(task) -> dict | None:
    return ARITH_TEMPLATES if isinstance(task, ArithTask) else None


__all__ = ["ArithTask", "get_task", "task_templates"]
