"""One reader for ``KEY=VALUE`` values typed on a command line or in a list of options.

Config overrides (``train.lr=3e-4``) and task options (``data.task_options=min_digits=1``) read their
values the same way, here; this module imports nothing of the package, so both can use it.
"""

from __future__ import annotations

from typing import Any

import yaml


def yaml_value(text: str) -> Any:
    """``text`` read as YAML (``3`` int, ``0.5`` float, ``true`` bool, ``[a, b]`` list, ...); ``""`` stays
    ``""``, and text YAML cannot read (``a: b: c``, an integer of more than 4300 digits, which Python
    refuses to convert) is returned as the string it is, for the caller's type checks to judge."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):  # ValueError: int('9' * 5000) exceeds Python's digit limit
        return text
