"""Tasks: seeded problem generators with a reward (``reward(completion, answer) -> float``)."""

from __future__ import annotations

from .arith import TEMPLATES as ARITH_TEMPLATES
from .arith import ArithTask


def get_task(data_cfg):
    """The task named by ``data.task`` (see its help text), or the mixture ``data.mixture``."""
    if getattr(data_cfg, "mixture", None):
        from .mixture import MixtureTask, parse_mixture

        pairs = parse_mixture(data_cfg.mixture)
        return MixtureTask([load_source(src, data_cfg) for src, _ in pairs], [w for _, w in pairs])
    if data_cfg.task == "arith":
        return ArithTask(digits=data_cfg.arith_digits, terms=data_cfg.arith_terms,
                         style=getattr(data_cfg, "arith_style", "plain"))
    return load_source(data_cfg.task, data_cfg)


def load_source(t: str, data_cfg):
    """One data set (``reasoning_gym:<task>``, ``champ``, a file or a hub id) as a
    :class:`~ogls_sd.tasks.dataset.DatasetTask`, with the ``data.*`` column settings."""
    from ..data import files

    if t.startswith("reasoning_gym:"):
        res = files.load_reasoning_gym(t.split(":", 1)[1], size=data_cfg.size, seed=data_cfg.seed)
    elif t == "champ":
        res = files.load_champ()
    else:
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


def split_task(res, source: str, data_cfg):
    """The loaded examples as a task with its held-out split (``data.eval_size``, ``data.eval_fraction_max``)."""
    from ..data import files
    from .dataset import DatasetTask

    files.require_examples(res, source)  # none usable: say how many rows were skipped and why
    return DatasetTask(res.examples, test_size=data_cfg.eval_size, max_test_fraction=data_cfg.eval_fraction_max,
                       name=source, skipped=res.skipped, duplicates=res.duplicates)


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


def task_templates(task) -> dict | None:
    return ARITH_TEMPLATES if isinstance(task, ArithTask) else None


__all__ = ["ArithTask", "answer_extractor", "column_settings", "get_task", "load_source", "rows_task", "split_task",
           "task_templates"]
