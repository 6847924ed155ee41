"""Tasks: seeded problem generators with a reward (``reward(completion, answer) -> float``)."""

from __future__ import annotations

from .arith import TEMPLATES as ARITH_TEMPLATES
from .arith import ArithTask


def get_task(data_cfg):
    """The task named by ``data.task`` (see its help text)."""
    from ..data import files
    from .dataset import DatasetTask

    t = data_cfg.task
    if t == "arith":
        return ArithTask(digits=data_cfg.arith_digits, terms=data_cfg.arith_terms,
                         style=getattr(data_cfg, "arith_style", "plain"))
    if t.startswith("reasoning_gym:"):
        res = files.load_reasoning_gym(t.split(":", 1)[1], size=data_cfg.size, seed=data_cfg.seed)
    elif t == "champ":
        res = files.load_champ()
    else:
        columns = {"problem": data_cfg.problem_column, "answer": data_cfg.answer_column,
                   "reference": data_cfg.reference_column or None}
        res = files.load_examples(t, columns=columns, split=data_cfg.split, policy=data_cfg.policy,
                                  max_chars=data_cfg.max_chars, config=data_cfg.hub_config or None)
    files.require_examples(res, t)  # none usable: say how many rows were skipped and why
    task = DatasetTask(res.examples, test_size=data_cfg.eval_size, max_test_fraction=data_cfg.eval_fraction_max, name=t, skipped=res.skipped,
                       duplicates=res.duplicates)
    return task


def task_templates(task) -> dict | None:
    return ARITH_TEMPLATES if isinstance(task, ArithTask) else None


__all__ = ["ArithTask", "get_task", "task_templates"]
