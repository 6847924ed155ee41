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


# The repetition-loop rule (docs/metrics.md, `completion/loop_frac`)
LOOP_MAX_PERIOD = 16  # longest repeated n-gram looked for, in tokens
LOOP_MIN_REPEATS = 3  # the tail must hold at least this many copies of it ...
LOOP_MIN_SPAN = 12  # ... and span at least this many tokens


def is_repetition_loop(ids: list[int], finished: bool) -> bool:
    """Whether a completion is stuck in a repetition loop: it hit the generation limit (no EOS) and
    its tail is periodic — for some period n ≤ ``LOOP_MAX_PERIOD``, the last
    ``max(LOOP_MIN_REPEATS·n, LOOP_MIN_SPAN)`` tokens satisfy ``ids[i] == ids[i − n]`` (the same
    n-gram repeated back to back). A completion that ended with EOS is never a loop."""
    if finished:
        return False
    for n in range(1, LOOP_MAX_PERIOD + 1):
        span = max(LOOP_MIN_REPEATS * n, LOOP_MIN_SPAN)
        if len(ids) < span + n:
            break
        tail = ids[-(span + n):]
        if all(tail[i] == tail[i - n] for i in range(n, len(tail))):
            return True
    return False


def loop_fraction(rollouts) -> float:
    """``completion/loop_frac``: the fraction of ``rollouts`` (objects with ``ids`` and ``finished``)
    that :func:`is_repetition_loop`."""
    rollouts = list(rollouts)
    return sum(is_repetition_loop(list(r.ids), r.finished) for r in rollouts) / max(1, len(rollouts))

