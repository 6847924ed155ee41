"""Tasks: seeded problem generators and data sets, each grading completions (:class:`~.base.Task`).

Every module of this package that defines a named task registers it with
:func:`~.base.register_task` (``arith``, ``champ``, ``reasoning_gym:<task>``); importing the
package imports them all, and ``data.task`` (validated against :data:`ogls_sd.registry.TASKS`, with
a did-you-mean) is looked up there. Any other ``data.task`` is a data file or a hub id, read as a
:class:`~.dataset.DatasetTask` with the ``data.*`` column settings. Adding a task is one module here.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .arith import TEMPLATES as ARITH_TEMPLATES  # noqa: E402  (re-exported names)
from .arith import ArithTask  # noqa: E402
from .base import Task, TaskSpec, register_task, source_error, task_spec  # noqa: E402
from .dataset import DatasetTask, split_task  # noqa: E402


def get_task(data_cfg) -> Task:
    """The task named by ``data.task`` (see its help text), or the mixture ``data.mixture``."""
    if getattr(data_cfg, "mixture", None):
        from .mixture import MixtureTask, parse_mixture

        pairs = parse_mixture(data_cfg.mixture)
        return MixtureTask([load_source(src, data_cfg) for src, _ in pairs], [w for _, w in pairs])
    return load_source(data_cfg.task, data_cfg)


def load_source(t: str, data_cfg) -> Task:
    """The registered task ``t`` names (built by its module), or else the data file / hub id ``t``
    as a :class:`~ogls_sd.tasks.dataset.DatasetTask`, with the ``data.*`` column settings."""
    from ..data import files

    found = task_spec(t)
    if found is not None:
        spec, argument = found
        return spec.build(data_cfg, argument)
    columns, transforms = column_settings(data_cfg)
    res = files.load_examples(t, columns=columns, split=data_cfg.split, policy=data_cfg.policy,
                              max_chars=data_cfg.max_chars, config=data_cfg.hub_config or None,
                              transforms=transforms)
    return split_task(res, t, data_cfg)


def rows_task(rows, data_cfg, name: str = "data"):
    """Rows in memory (a list of dicts or a ``datasets.Dataset``: the Python API's ``data=``) as a
    :class:`~ogls_sd.tasks.dataset.DatasetTask`, read with the ``data.*`` column settings like a file.
    ``fingerprint`` (a hash of the examples) stands in for ``data.task`` in the warm-start cache key."""
    import hashlib
    import json

    from ..data import files

    columns, transforms = column_settings(data_cfg)
    res = files.load_rows(rows, columns, policy=data_cfg.policy, max_chars=data_cfg.max_chars, source=name,
                          transforms=transforms)
    task = split_task(res, name, data_cfg)
    fields = [[ex.problem, ex.reference, ex.answer, ex.id] for ex in res.examples]
    task.fingerprint = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
    return task


def column_settings(data_cfg) -> tuple[dict, dict | None]:
    """``(columns, transforms)`` for :func:`~ogls_sd.data.files.load_examples` from ``data.*_column``
    and ``data.answer_from``."""
    columns = {"problem": data_cfg.problem_column, "answer": data_cfg.answer_column,
               "reference": data_cfg.reference_column or None}
    transforms = None
    if getattr(data_cfg, "answer_from", "column") != "column":  # the answer is derived from the reference
        columns["answer"] = data_cfg.reference_column
        transforms = {"answer": answer_extractor(data_cfg.answer_from)}
    return columns, transforms


def answer_extractor(spec: str):
    """``data.answer_from`` as a function reference text -> answer: ``reference_boxed`` (the last
    non-empty outermost ``\\boxed{}``) or ``module:function`` (imported; the user's own code)."""
    if spec == "reference_boxed":
        from ..rewards.verifier import boxed_answer

        return boxed_answer
    import importlib

    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data.answer_from={spec}: cannot import {fn} from {mod} ({e})") from None


def task_templates(task: Task) -> dict | None:
    """The task's own templates (:meth:`Task.templates`), or None."""
    return task.templates()


__all__ = ["ARITH_TEMPLATES", "ArithTask", "DatasetTask", "Task", "TaskSpec", "answer_extractor", "column_settings",
           "get_task", "load_source", "register_task", "rows_task", "source_error", "split_task", "task_spec",
           "task_templates"]
