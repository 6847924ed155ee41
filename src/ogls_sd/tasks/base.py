"""What every task is (:class:`Task`) and how a task module registers itself (:func:`register_task`).

A task serves examples (a generator, or a data set split into training and held-out rows) and
grades completions. Everything the rest of the package reads of a task is a member of
:class:`Task`, with a default where a task may have nothing to say (no rows skipped, no plain
reference, no templates of its own), so no caller asks ``hasattr(task, ...)``.

``data.task`` names a registered task (``arith``), a registered family with an argument
(``reasoning_gym:<task>``), or else a data file / hub id (:class:`~ogls_sd.tasks.dataset.DatasetTask`).
Adding a task is one module in ``ogls_sd/tasks/``::

    @register_task("countdown", "reach a target number with + - * / (generated)")
    def build_countdown(data_cfg, argument: str) -> Task:
        return CountdownTask(seed=data_cfg.seed)

The package imports every module of ``ogls_sd/tasks/``; config validation (``data.task``,
``data.mixture``) and :func:`~ogls_sd.tasks.get_task` read :data:`ogls_sd.registry.TASKS`.
"""

from __future__ import annotations

import abc
import difflib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from ..data.example import Example
from ..registry import TASKS
from ..rewards.verifier import extract_answer
from ..values import yaml_value


class Task(abc.ABC):
    """The task protocol. A subclass implements :meth:`examples` and :meth:`reward`; the rest has
    defaults. Attributes (class defaults; a dataclass task may make them fields):

    * ``name``: a label for logs and the ``ogls-sd check`` line;
    * ``skipped`` / ``duplicates``: rows the loader dropped (bad rows; repeated problems);
    * ``fingerprint``: a hash of rows given in memory (stands in for ``data.task`` in the warm-start cache key);
    * ``template_marker``: a string whose presence in a completion means it copied the reference's
      template (counted as ``markers/template``; None: the task has none).
    """

    name: str = "task"
    skipped: int = 0
    duplicates: int = 0
    fingerprint: str = ""
    template_marker: str | None = None

    @abc.abstractmethod
    def examples(self, n: int, seed: int, split: str = "train") -> list[Example]:
        """``n`` examples of ``split`` (``train`` or ``test``, never overlapping), seeded."""

    @abc.abstractmethod
    def reward(self, completion: str, answer: str) -> float:
        """The task's own grade of one completion (1.0 correct, 0.0 not)."""

    def rewards(self, completions: list[str], answers: list[str]) -> list[float]:
        """:meth:`reward` of each pair (a task may grade a batch at once, e.g. in worker processes)."""
        return [self.reward(c, a) for c, a in zip(completions, answers)]

    def extract(self, text: str) -> str | None:
        """The final answer a completion states (``ogls-sd eval``'s ``extracted`` and maj@k; default:
        the shared verifier's last ``\\boxed{}`` / ``####`` / ``Answer:``), or None."""
        return extract_answer(text)

    def wrong_attempt(self, ex: Example, rng: random.Random) -> str:
        """A plausible wrong solution of ``ex`` (the tiny model's warm start shows it in the context
        template)."""
        raise NotImplementedError(f"task {self.name} writes no wrong attempts (the warm start of model.name=tiny "
                                  "needs them)")

    def plain_reference(self, ex: Example) -> str:
        """``ex``'s solution in the student's own style (default: the reference as given)."""
        return ex.reference

    def templates(self) -> dict | None:
        """The task's own compact templates (``templates.task_defaults``), or None."""
        return None

    @property
    def split_sizes(self) -> tuple[int, int] | None:
        """``(training, held out)`` row counts of a data set; None for a generator (no fixed rows)."""
        return None

    def describe(self) -> str:
        """One line for ``ogls-sd check``: what data the task serves."""
        return f"data: built-in task {self.name}"


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: ``data.task=<name>``, or ``<name>:<argument>`` when ``argument`` names one."""

    name: str
    summary: str
    build: Callable  # (data_cfg, argument: str) -> Task
    argument: str = ""  # e.g. "<task>": the task is a family, data.task=<name>:<argument>
    mixable: bool = True  # may be a data.mixture source (a data set; not a generator)
    options: str = ""  # what data.task_options sets for this task ('' = it takes none)

    @property
    def shown(self) -> str:
        """How ``data.task`` spells it: ``arith``, ``reasoning_gym:<task>``."""
        return f"{self.name}:{self.argument}" if self.argument else self.name


def register_task(name: str, summary: str, *, argument: str = "", mixable: bool = True, options: str = ""):
    """Decorator of ``build(data_cfg, argument) -> Task``: registers ``data.task=name`` (or the
    family ``name:<argument>`` when ``argument`` describes one; ``argument`` is then what follows
    the colon, else ''). ``mixable=False``: a generator that cannot be a ``data.mixture`` source.
    ``options``: what ``data.task_options`` sets for this task (the builder reads
    :func:`parse_task_options` of it); '' = the task takes none and refuses them."""

    def wrap(build: Callable) -> Callable:
        TASKS.register(name, TaskSpec(name, summary, build, argument, mixable, options))
        return build

    return wrap


def task_spec(source: str) -> tuple[TaskSpec, str] | None:
    """``(spec, argument)`` of the registered task ``source`` names, or None (a file or hub id)."""
    head, sep, arg = str(source).partition(":")
    spec = TASKS[head] if isinstance(source, str) and head in TASKS else None
    if spec is None or bool(sep) != bool(spec.argument):
        return None
    return spec, arg


def parse_task_options(entries: list[str], key: str = "data.task_options") -> dict[str, Any]:
    """``["min_digits=1", "max_terms=2"]`` -> ``{"min_digits": 1, "max_terms": 2}``; each value is
    read as a YAML scalar (``3`` int, ``0.5`` float, ``true`` bool, anything else a string).

    Raises:
        ValueError: an entry without ``=``, an empty or repeated key (the message names ``key[i]``).
    """
    out: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        name, sep, raw = str(entry).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{key}[{i}]: expected KEY=VALUE, got {entry!r}")
        if name in out:
            raise ValueError(f"{key}[{i}]: {name!r} is given twice")
        value = yaml_value(raw.strip())
        out[name] = value if isinstance(value, (int, float, bool, str)) else raw.strip()
    return out


def options_error(source: str, entries: list[str], key: str = "data.task_options") -> str | None:
    """Why ``entries`` cannot be ``data.task_options`` for ``data.task=source``; None when they can."""
    if not entries:
        return None
    try:
        parse_task_options(entries, key)
    except ValueError as e:
        return str(e)
    found = task_spec(source)
    if found is None or not found[0].options:
        takers = ", ".join(spec.shown for _, spec in TASKS.items() if spec.options) or "none"
        return f"{key}: data.task={source!r} takes no options (tasks that do: {takers})"
    return None


def source_error(source: str, key: str = "data.task") -> str | None:
    """Why ``source`` cannot be a ``data.task`` value, one line naming ``key``; None when it can.

    A registered name (or family with a non-empty argument) is accepted; so is anything that may be
    a file or hub id (an existing path, or a name with ``/`` or ``.``). A bare word or ``name:...``
    that is neither registered nor a file is refused when it is close to a registered name (a typo:
    ``arth`` -> did you mean arith?); other bare words are kept as hub ids."""
    found = task_spec(source)
    if found is not None:
        spec, arg = found
        if spec.argument and not arg:
            return f"{key}: {spec.name}: needs {spec.shown} (e.g. {spec.name}:{_example(spec)})"
        return None
    if os.path.exists(source) or "/" in source or "." in source:
        return None
    head = source.partition(":")[0]
    close = difflib.get_close_matches(head[:200], list(TASKS), n=1)
    if ":" not in source and not close:
        return None  # a hub id without an owner
    hint = f" (did you mean {TASKS[close[0]].shown}?)" if close else ""
    shown = ", ".join(spec.shown for _, spec in TASKS.items())
    return (f"{key}: {_brief(source)} is not one of {shown}{hint}, nor a data file "
            "(.jsonl/.json/.parquet/.csv) or a hub id (owner/name)")


def _brief(value: str) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"


def _example(spec: TaskSpec) -> str:
    return spec.argument.strip("<>") or "name"
