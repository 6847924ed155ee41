"""Reward functions (``reward.funcs``): what turns a completion into a reward, and which rollouts
count as correct.

A reward function is called like TRL's::

    f(prompts: list[str], completions: list[str], **columns) -> list[float]

with one entry per completion: ``prompts[i]`` is the decoded student prompt completion ``i``
answered (chat template and special tokens included: what the model saw), ``completions[i]`` its
decoded text, and ``columns`` the example's columns as lists of the same length: ``problem``,
``reference``, ``answer``, ``id`` and every other column of the example's source
(``Example.extra``: a data file's unmapped columns, a reasoning-gym ``entry`` and its ``metadata``;
``None`` where an example lacks one). Take what you need by name and ignore the rest with
``**columns``.

A run's reward is the weighted sum of its functions' rewards; a rollout is correct (the positive
pool, held-out accuracy) when that sum is ``> reward.success_threshold``. With no functions the
task's own grader (``verifier``) is the only one, weight 1: the rewards and pools of a run without
``reward.funcs`` are exactly those of the task.

A function is named in ``reward.funcs`` as ``module:function`` (imported; your own code) or by a
built-in name (registered below with :func:`register_reward`), each optionally ``=weight``.
Everything a function returns is checked: one number (``int``/``float``, not NaN or infinite) per
completion; anything else, or an exception, is a :class:`RewardError` naming the function.
Completions are only ever passed to functions as text; nothing here evaluates them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..data.example import Example
from ..registry import REWARDS
from .verifier import boxed_answer

RewardFn = Callable[..., Sequence[float]]

FIELDS = ("problem", "reference", "answer", "id")  # every example's columns, always passed
_SPEC = re.compile(r"(?P<target>[A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)(?:=(?P<weight>[^=]+))?")


class RewardError(ValueError):
    """A reward function could not be loaded, raised, or returned something unusable. The message
    is one line naming the function (``reward.funcs[1] mymod:f returned 7 values for 8 completions``)."""


@dataclass(frozen=True)
class BuiltinReward:
    """A reward function named without a module (``reward.funcs=reasoning_gym``)."""

    name: str
    summary: str
    build: Callable  # task -> RewardFn (the function may read the task, as the verifier does)


def register_reward(name: str, summary: str):
    """Decorator of ``build(task) -> reward function``: registers the built-in ``name``."""

    def wrap(build: Callable) -> Callable:
        REWARDS.register(name, BuiltinReward(name, summary, build))
        return build

    return wrap


@dataclass(frozen=True)
class RewardSpec:
    """One resolved entry: its label in messages, the function (or a built-in), its weight."""

    label: str
    fn: RewardFn | BuiltinReward
    weight: float = 1.0

    @property
    def name(self) -> str:
        """Short name for metrics (``reward/fn/<name>``): the built-in's or the function's name."""
        return self.fn.name if isinstance(self.fn, BuiltinReward) else getattr(self.fn, "__name__", "fn")


# ------------------------------------------------------------------------------ parsing, loading
def parse_entry(entry: str, label: str) -> tuple[str, float]:
    """``"mymod:f=0.5"`` -> ``("mymod:f", 0.5)``; a built-in name or ``module:function``, weight 1
    unless given. Raises :class:`RewardError` on bad syntax or a weight that is not a finite number."""
    m = _SPEC.fullmatch(str(entry).strip())
    if m is None:
        raise RewardError(f"{label}: {entry!r} is not NAME or module:function, optionally =WEIGHT "
                          f"(e.g. mymod:score=0.5; built-in names: {', '.join(REWARDS) or 'none'})")
    target, weight = m["target"], m["weight"]
    if ":" not in target and target not in REWARDS:
        raise RewardError(f"{label}: {REWARDS.unknown(target)} (or give module:function)")
    try:
        w = float(weight) if weight is not None else 1.0
    except ValueError:
        raise RewardError(f"{label}: weight {weight!r} is not a number") from None
    if not math.isfinite(w):
        raise RewardError(f"{label}: weight must be finite, got {weight!r}")
    return target, w


def load_entry(entry: str, label: str) -> RewardSpec:
    """Parse and import one ``reward.funcs`` entry (a failing import is a :class:`RewardError`)."""
    target, weight = parse_entry(entry, label)
    label = f"{label} {target}"
    if ":" not in target:
        return RewardSpec(label, REWARDS[target], weight)
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise RewardError(f"{label}: cannot import {name} from {module} ({type(e).__name__}: {_one_line(e)}); "
                          "the module must be importable (on sys.path / PYTHONPATH)") from None
    if not callable(fn):
        raise RewardError(f"{label}: {module}.{name} is a {type(fn).__name__}, not a function")
    return RewardSpec(label, fn, weight)


def resolve(entries: Sequence[str], extra: Sequence[Any] = ()) -> list[RewardSpec]:
    """The run's reward functions: ``reward.funcs`` entries, then the Python API's ``rewards``
    (a callable, ``(callable, weight)`` or an entry string each). Every import happens here."""
    specs = [load_entry(e, f"reward.funcs[{i}]") for i, e in enumerate(entries)]
    for i, item in enumerate(extra):
        label = f"rewards[{i}]"
        if isinstance(item, str):
            specs.append(load_entry(item, label))
            continue
        fn, weight = item if isinstance(item, tuple) and len(item) == 2 else (item, 1.0)
        if not callable(fn):
            raise RewardError(f"{label}: expected a function or (function, weight), got {type(item).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RewardError(f"{label}: weight must be a finite number, got {weight!r}")
        specs.append(RewardSpec(f"{label} {getattr(fn, '__qualname__', type(fn).__name__)}", fn, float(weight)))
    return specs


# ------------------------------------------------------------------------------------- scoring
def example_columns(examples: Sequence[Example]) -> dict[str, list]:
    """The keyword arguments of a reward function for these examples (one per completion)."""
    cols: dict[str, list] = {f: [getattr(ex, f) for ex in examples] for f in FIELDS}
    names = dict.fromkeys(k for ex in examples for k in ex.extra)  # every example's extra columns, in order
    for k in names:
        if k not in cols and k not in ("prompts", "completions"):
            cols[k] = [ex.extra.get(k) for ex in examples]
    return cols


def checked(label: str, out: Any, n: int) -> list[float]:
    """``out`` as ``n`` finite floats, or a :class:`RewardError` naming the function."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # a numpy array or a tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"{label} returned {type(out).__name__}, not a list of {n} numbers")
    if len(out) != n:
        raise RewardError(f"{label} returned {len(out)} values for {n} completions")
    values = []
    for i, v in enumerate(out):
        if not isinstance(v, numbers.Real):
            raise RewardError(f"{label} returned {type(v).__name__} {_short(v)} for completion {i} of {n}, not a number")
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"{label} returned {v} for completion {i} of {n}; rewards must be finite")
        values.append(v)
    return values


class RewardSet:
    """The run's reward functions bound to its task, and its success threshold."""

    def __init__(self, specs: Sequence[RewardSpec], task, threshold: float = 0.5):
        specs = list(specs) or [RewardSpec("verifier", REWARDS["verifier"])]
        self.labels = [s.label for s in specs]
        self.weights = [s.weight for s in specs]
        self.names = _unique([s.name for s in specs])
        self.fns = [s.fn.build(task) if isinstance(s.fn, BuiltinReward) else s.fn for s in specs]
        self.threshold = threshold
        self.last_means: dict[str, float] = {}  # per function, unweighted, of the latest score() call

    def score(self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """The weighted sum of every function's rewards, one per completion."""
        n = len(completions)
        cols = example_columns(examples)
        total = [0.0] * n
        self.last_means = {}
        for label, name, fn, w in zip(self.labels, self.names, self.fns, self.weights):
            try:
                out = fn(list(prompts), list(completions), **{k: list(v) for k, v in cols.items()})
            except Exception as e:  # noqa: BLE001 - any failure of the user's function is reported the same way
                hint = (" (a reward function takes (prompts, completions, **columns))"
                        if isinstance(e, TypeError) and "argument" in str(e) else "")
                raise RewardError(f"{label} raised {type(e).__name__}: {_one_line(e)}{hint}") from e
            values = checked(label, out, n)
            total = [t + w * v for t, v in zip(total, values)]
            self.last_means[name] = sum(values) / n if n else 0.0
        return total

    def correct(self, rewards: Sequence[float]) -> list[bool]:
        return [r > self.threshold for r in rewards]


def _unique(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _one_line(e: object) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# ------------------------------------------------------------------------------------ built-ins
@register_reward("verifier", "the task's own grader, 1 or 0: arith's integer after the last 'A:', the math verifier "
                             "for other tasks; the default")
def task_verifier(task) -> RewardFn:
    def verifier(prompts, completions, answer, **_):
        return task.rewards(list(completions), list(answer))  # Task.rewards: a batch (default: reward of each)

    return verifier


@register_reward("reasoning_gym", "for data.task=reasoning_gym:<name>: that task's own score_answer on the last "
                                  "\\boxed{} of the completion, None without one")
def reasoning_gym_builtin(task) -> RewardFn:
    return reasoning_gym_score


def reasoning_gym_score(prompts, completions, entry=None, **_) -> list[float]:
    """reasoning-gym's own scorer: ``score_answer(answer, entry)`` of the task that generated the
    example (``entry["metadata"]["source_dataset"]``), where ``answer`` is the content of the
    completion's last non-empty outermost ``\\boxed{}`` (the rule ``data.answer_from=reference_boxed``
    reads), or ``None`` when it has none, which reasoning-gym scores as no answer. Needs the
    ``entry`` column that ``data.task=reasoning_gym:<name>`` keeps in ``Example.extra``."""
    if entry is None or any(not isinstance(e, dict) for e in entry):
        raise ValueError("an example has no reasoning-gym entry: use it with data.task=reasoning_gym:<name> "
                         "(or a data.mixture of reasoning_gym sources)")
    return [float(_rg_scorer(e["metadata"]["source_dataset"])(last_boxed(c), e)) for c, e in zip(completions, entry)]


# eval( on anything but the task's own entry: a scorer that would run the model's answer as Python
_EVAL_OF_ANSWER = re.compile(r"(?<![\w.])eval\((?!\s*entry\b)")


@functools.lru_cache(maxsize=None)
def _rg_scorer(name: str) -> Callable:
    """reasoning-gym's ``score_answer`` of task ``name``; refused when it calls ``eval()`` on the
    answer (string_insertion, spiral_matrix, binary_matrix, n_queens in reasoning-gym 0.1.19): the
    answer is model output, and ogls-sd never evaluates model output."""
    import reasoning_gym  # the optional `data` extra; the entries exist only if it is installed

    fn = reasoning_gym.get_score_answer_fn(name)
    if _EVAL_OF_ANSWER.search(inspect.getsource(fn)):
        raise ValueError(f"reasoning-gym task {name!r} scores by calling eval() on the answer (model output), which "
                         "ogls-sd never does: write a reward function of your own for this task")
    return fn


def last_boxed(text: str) -> str | None:
    """The content of the last non-empty outermost ``\\boxed{}`` of ``text``, or None."""
    try:
        return boxed_answer(text)
    except ValueError:
        return None
