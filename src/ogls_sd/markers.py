"""Marker counts per completion (method.md §6): the task's template marker and reflection words."""

from __future__ import annotations

import re


def count_markers(text: str, markers: list[str]) -> int:
    """Occurrences of any of ``markers`` in ``text`` (case-insensitive; word-bounded when the
    marker starts/ends with a letter, so "wait" does not count inside "await")."""
    n = 0
    low = text.lower()
    for m in markers or []:
        m = m.lower().strip()
        if not m:
            continue
        pat = re.escape(m)
        if m[0].isalnum():
            pat = r"\b" + pat
        if m[-1].isalnum():
            pat = pat + r"\b"
        n += len(re.findall(pat, low))
    return n


def marker_metrics(texts: list[str], template_marker: str | None, reflection_markers: list[str]) -> dict[str, float]:
    """``markers/template`` (mean count of the task's template marker per completion, when the task
    has one) and ``markers/reflection`` (mean count of reflection markers per completion)."""
    n = max(1, len(texts))
    out = {"markers/reflection": sum(count_markers(t, reflection_markers) for t in texts) / n}
    if template_marker:
        out["markers/template"] = sum(t.count(template_marker) for t in texts) / n
        out["markers/template_frac"] = sum(template_marker in t for t in texts) / n
    return out
