"""Registries: the one place each extension point is looked up by name.

An algorithm (``algorithms/``), and the config section it brings, registers itself here when its
module is imported; so does a built-in reward function (``rewards/functions.py``, ``reward.funcs``),
a rollout backend (``rollout/``, ``rollout.backend``) and a named task (``tasks/``, ``data.task``);
config validation, the trainer, ``compare`` and the CLI help read these tables
and name no algorithm themselves. This module imports nothing from the package, so every other
module may read it (imports point one way: ``config`` → ``registry`` ← ``algorithms``).
"""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in registration order. ``name in reg``, ``reg[name]`` (a ``KeyError`` that lists
    the known names and the closest match), iteration over names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{self.kind}: a registered name must be an identifier, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def unknown(self, name: object) -> str:
        """One line: ``name`` is not registered, the known names, and the closest one."""
        return self.listing(self._items, name)

    @staticmethod
    def listing(names, name: object) -> str:
        """``'x' is not one of a, b, c (did you mean b?)``."""
        names = [str(n) for n in names]
        shown = repr(name)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"
        close = difflib.get_close_matches(str(name)[:200], names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{shown} is not one of {', '.join(names)}{hint}"

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise KeyError(f"{self.kind}: {self.unknown(name)}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


# train.algorithm -> AlgorithmSpec (algorithms/base.py)
ALGORITHMS: Registry = Registry("train.algorithm")
# config sections that registered modules bring (name -> section dataclass, config.py's _Section)
SECTIONS: Registry = Registry("config section")
# reward.funcs entries without a module (verifier, reasoning_gym) -> BuiltinReward (rewards/functions.py)
REWARDS: Registry = Registry("reward function")
# rollout.backend (and eval.backend) -> BackendSpec (rollout/contract.py): one module of rollout/ each
BACKENDS: Registry = Registry("rollout.backend")
# data.task names (arith, champ, the family reasoning_gym:<task>) -> TaskSpec (tasks/base.py): one module of tasks/ each
TASKS: Registry = Registry("data.task")
