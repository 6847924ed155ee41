"""Data: tasks, local files, hub data sets and benchmarks, all yielding `Example`s."""

from .example import Example

__all__ = ["Example"]
