"""Task ``champ``: the CHAMP competition-math problems shipped with the package, graded by the
shared math verifier, with a seeded held-out split (``data.eval_size``)."""

from __future__ import annotations

from ..data import files
from .base import register_task
from .dataset import DatasetTask, split_task


@register_task("champ", "the CHAMP competition-math problems (bundled), graded by the math verifier")
def build_champ(data_cfg, argument: str) -> DatasetTask:
    return split_task(files.load_champ(), "champ", data_cfg)
