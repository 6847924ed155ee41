"""Final-answer extraction and answer verification for math-style reasoning tasks.

Two layers:

* :func:`extract_answer` pulls the final answer out of a completion. It is pure Python, runs in
  linear time on any input (a 1 MB string, 100k nested braces, any number of empty boxes) and
  never recurses.
* :class:`Verifier` decides whether an extracted answer equals a gold answer. Cheap cases
  (no answer, over-long answer, hedged answer, identical strings, equal or unequal integers) are
  decided in the calling process, then a cheap size/shape pre-filter
  (:mod:`ogls_sd.rewards.prefilter`) rejects answers that would make sympy compute for seconds
  (``9^{9^{9^9}}``, ``1000000!``, 30 nested ``\\frac``). Everything else goes to
  `math-verify <https://github.com/huggingface/Math-Verify>`_ (``math_verify.parse`` /
  ``math_verify.verify``) in a worker process started as ``python -m ogls_sd.rewards.mv_worker``
  (a plain subprocess talking JSON lines over pipes, see :mod:`ogls_sd.rewards.mv_worker`).
  Because it is not started by ``multiprocessing``, it never re-imports the caller's
  ``__main__``: :func:`verify` works from a script without an ``if __name__ == "__main__":``
  guard and from ``python -``. math-verify's own timeout uses ``signal.alarm`` and stays off
  (``parsing_timeout=None``, ``timeout_seconds=None``); the limit is enforced here instead: a
  check that runs past ``timeout`` seconds is reported as ``"timeout"`` and the worker running
  it is killed and replaced, so a pathological answer that passes the pre-filter can never hang
  the caller. Each worker has an address-space cap. A ``Verifier`` can be used from any thread.
  Model output is never passed to ``eval``.

Which answer is graded (boxes): the content of the **last non-empty outermost** ``\\boxed{...}``
(or ``\\fbox{...}``), with proper brace matching. Empty boxes (an echoed "put your answer in
\\boxed{}") are ignored, however many there are. A box whose content contains another box
(``\\boxed{12 \\text{ or } \\boxed{13}}``, ``\\boxed{\\boxed{7}}``) is a hedge and never scores
(reason ``"hedge"``); the inner box is never graded on its own. The box content is graded as a
whole: if math-verify cannot parse all of it, it does not fall back to a sub-expression, so a
two-answer hedge such as ``\\boxed{12 \\lor 13}`` or ``\\boxed{12 \\text{ or } 13}`` does not equal
``13``. Several values offered at once are a hedge as well (:func:`is_hedge`): ``or`` / ``and``
in the box (unless the gold answer has them), two different numbers related by ``=`` or
``\\approx`` (``\\boxed{12 = 13}``; ``x = 13`` is one value), and the last box joined to the box
before it on the same line (``\\boxed{3} or \\boxed{4}``, read by math-verify as the set {3, 4}).
With no box, the rest of the line after the last ``####``, else the value after the last
``Answer:`` / ``answer is`` is graded.

Result reasons (:attr:`VerifyResult.reason`):

``"ok"``           the answer is correct.
``"wrong"``        an answer was found and parsed, and it is not equivalent to the gold answer.
``"no_answer"``    no final answer could be extracted from the completion.
``"too_long"``     the extracted answer (or the gold answer) is longer than ``max_answer_chars``.
``"hedge"``        the graded answer offers several values (a box in the box, "or", ``12 = 13``, joined boxes).
``"too_complex"``  the pre-filter rejected the answer (too deeply nested, a huge number such as a
                   power tower or factorial, a huge exponent); math-verify was not run.
``"parse_error"``  math-verify could not parse the extracted answer (or the gold answer).
``"timeout"``      the equivalence check ran past the time limit (its worker was killed).
``"error"``        the worker process died (e.g. out of memory) twice on this item.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

from .prefilter import reject_reason

__all__ = [
    "REASONS",
    "VerifyResult",
    "Verifier",
    "extract_answer",
    "get_default_verifier",
    "normalize_answer",
    "verify",
    "verify_batch",
]

logger = logging.getLogger(__name__)

Mode = Literal["math", "exact"]
REASONS = ("ok", "wrong", "no_answer", "too_long", "hedge", "too_complex", "parse_error", "timeout", "error")

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_ANSWER_CHARS = 1000


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one verification.

    Attributes:
        correct: True iff the extracted answer is equivalent to the gold answer.
        reason: one of :data:`REASONS` (``"ok"`` exactly when ``correct``).
        extracted: the answer extracted from the completion, or None when there was none. It may
            be longer than ``max_answer_chars`` (then ``reason == "too_long"``).
    """

    correct: bool
    reason: str
    extracted: str | None


# ---------------------------------------------------------------------------------- extraction

# Tokens that matter to the brace matcher. Escaped braces (\{ and \}) come first so that they are
# consumed as ordinary text; the box openers allow whitespace before their brace.
_BRACE_TOKENS = re.compile(r"\\[{}]|\\(?:boxed|fbox)[ \t\n]{0,16}\{|[{}]")
# "Answer: X", "answer is X", "Final Answer: X", "**Answer:** X", "the answer is: X". Every
# quantifier is bounded, so there is no catastrophic backtracking.
_ANSWER_MARKER = re.compile(
    r"\banswer(?:\*\*)?[ \t]{0,8}(?:is\b[ \t]{0,8}:?|:)(?:\*\*)?[ \t]{0,8}", re.IGNORECASE
)
_LOOKAHEAD_CHARS = 2000  # how far past an "Answer:" with nothing after it we look for the value


def _strip_wrappers(s: str) -> str:
    """Strip markdown bold, math delimiters and a trailing period around a one-line answer."""
    s = s.strip()
    for _ in range(3):
        before = s
        if s.startswith("**") and s.endswith("**") and len(s) >= 4:
            s = s[2:-2].strip()
        s = s.rstrip(".").strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left) : len(s) - len(right)].strip()
                break
        if s == before:
            break
    return s


def _rest_of_line(text: str, pos: int) -> str:
    end = text.find("\n", pos)
    return text[pos : len(text) if end < 0 else end]


def _last_hashes(text: str) -> str | None:
    """Value after the last ``####`` that has something after it on its line."""
    pos = text.rfind("####")
    while pos >= 0:
        value = _strip_wrappers(_rest_of_line(text, pos + 4).lstrip("#"))
        if value:
            return value
        pos = text.rfind("####", 0, pos)
    return None


def _last_answer_marker(text: str) -> str | None:
    """Value after the last ``Answer:`` / ``answer is`` marker.

    The value is the rest of the marker's line; if that is empty, the next non-empty line within
    ``_LOOKAHEAD_CHARS`` characters (e.g. ``Answer:\\n$$42$$``).
    """
    last = None
    for last in _ANSWER_MARKER.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    window = text[last.end() : last.end() + _LOOKAHEAD_CHARS]
    for line in window.split("\n"):
        value = _strip_wrappers(line)
        if value:
            return value
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None.

    Order of preference:

    1. the content of the last non-empty *outermost* complete ``\\boxed{...}`` or ``\\fbox{...}``,
       with proper (nested) brace matching; escaped braces ``\\{``/``\\}`` are literal, empty
       boxes are skipped (any number of them), and a box inside another box is never returned
       on its own (for ``\\boxed{12 \\boxed{13}}`` the result is ``12 \\boxed{13}``, which
       :class:`Verifier` grades as a hedge);
    2. else the rest of the line after the last ``#### `` (GSM8K style);
    3. else the value after the last ``Answer: X`` / ``answer is X`` (case-insensitive; markdown
       bold, ``$...$``, ``\\(...\\)``, ``\\[...\\]`` and a trailing period are stripped).

    Contract: runs in time linear in ``len(text)`` (a bounded number of passes, no recursion, no
    backtracking regexes), never raises on a ``str``, and returns a stripped, non-empty string or
    None. The result is not length-capped; :class:`Verifier` rejects over-long answers.
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_outermost_box(text)
    if boxed is not None:
        return boxed
    hashes = _last_hashes(text)
    if hashes is not None:
        return hashes
    return _last_answer_marker(text)


def _last_outermost_box(text: str) -> str | None:
    """Content of the last non-empty outermost complete ``\\boxed{...}`` / ``\\fbox{...}``, or None."""
    boxes = _last_outermost_boxes(text, 1)
    return text[boxes[0][1]:boxes[0][2]].strip() if boxes else None


def _last_outermost_boxes(text: str, k: int) -> list[tuple[int, int, int]]:
    """The last ``k`` non-empty outermost complete boxes, last first, as (token start, content
    start, content end).

    One pass collects every complete box (in closing order); matched braces make the boxes
    laminar, so walking them backwards, a box that starts after the current outermost one is
    inside it. Outermost boxes are disjoint, so stripping their contents is linear in total.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    stack: list[tuple[int, int]] = []  # (token start, content start); (-1, -1): a plain "{"
    boxes: list[tuple[int, int, int]] = []  # (token start, content start, content end)
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if len(tok) == 2 and tok[0] == "\\":  # escaped brace
            continue
        if tok == "}":
            if stack:
                tok_start, start = stack.pop()
                if tok_start >= 0:
                    boxes.append((tok_start, start, m.start()))
        elif tok[0] == "\\":
            stack.append((m.start(), m.end()))
        else:
            stack.append((-1, -1))
    outer_start = len(text)
    found: list[tuple[int, int, int]] = []
    for tok_start, start, stop in reversed(boxes):
        if tok_start > outer_start:
            continue  # nested in a later (outermost) box
        outer_start = tok_start
        if text[start:stop].strip():
            found.append((tok_start, start, stop))
            if len(found) == k:
                break
    return found


# A hedge (never scores): answers joined by "or"/"and" inside the graded box, several values
# related by = or ≈ in it, or a box joined to the previous box on the same line (math-verify
# reads "\\boxed{3} or \\boxed{4}" as the set {3, 4}).
_OR_WORDS = re.compile(r"(?<![A-Za-z])(?:or|\\lor|\\vee)(?![A-Za-z])", re.IGNORECASE)
_AND_WORDS = re.compile(r"(?<![A-Za-z])(?:and|\\land|\\wedge)(?![A-Za-z])", re.IGNORECASE)
_EQUALITIES = re.compile(r"\\(?:approx|simeq|equiv|sim|cong|doteq)(?![A-Za-z])|:=|=|\u2248")
_JOINED_GAP = 24  # characters between two boxes on one line that math-verify still reads together


_SIMPLE_FRACTION = re.compile(r"^([+-]?)\\[dt]?frac\{(\d{1,50})\}\{(\d{1,50})\}$|^([+-]?\d{1,50})/(\d{1,50})$")


def _numeric_value(side: str) -> Fraction | None:
    """A plain number or simple fraction (``12``, ``0.5``, ``\\frac{1}{2}``, ``3/4``), else None."""
    n = normalize_answer(side)
    num = _as_number(n)
    if num is not None:
        return num
    m = _SIMPLE_FRACTION.match(n)
    if m is None:
        return None
    if m.group(2) is not None:
        den = int(m.group(3))
        return Fraction(int(m.group(2)), den) * (-1 if m.group(1) == "-" else 1) if den else None
    den = int(m.group(5))
    return Fraction(int(m.group(4)), den) if den else None


def _distinct_values(sides: list[str]) -> bool:
    """Two of ``sides`` are numbers (or simple fractions) of different value."""
    values = {v for v in map(_numeric_value, sides) if v is not None}
    return len(values) > 1


_TEXT_OPENER = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{")


def _one_value(parts: list[str]) -> bool:
    """Every part of ``12 \\text{ or } 12``-style text is the same number (the same answer
    twice, not a hedge)."""
    values = set()
    for part in parts:
        s = _TEXT_OPENER.sub("", part).strip(" \t$")
        while s.count("}") > s.count("{") and (s.startswith("}") or s.endswith("}")):
            s = (s[1:] if s.startswith("}") else s[:-1]).strip(" \t$")
        while s.count("{") > s.count("}") and (s.startswith("{") or s.endswith("{")):
            s = (s[1:] if s.startswith("{") else s[:-1]).strip(" \t$")
        v = _numeric_value(s)
        if v is None:
            return False
        values.add(v)
    return len(values) == 1


def is_hedge(completion: str, extracted: str, gold: str) -> bool:
    """Whether the graded answer hedges between several values (see the module docstring)."""
    if _BOX_COMMAND.search(extracted):  # a box inside the graded box
        return True
    if _OR_WORDS.search(extracted) and not _OR_WORDS.search(gold) and not _one_value(_OR_WORDS.split(extracted)):
        return True
    if _AND_WORDS.search(extracted) and not (_AND_WORDS.search(gold) or "," in gold) \
            and not _one_value(_AND_WORDS.split(extracted)):
        return True
    if not _EQUALITIES.search(gold) and _distinct_values(_EQUALITIES.split(extracted)):
        return True
    last_two = _last_outermost_boxes(completion, 2)
    if len(last_two) == 2:
        (tok, _, _), (_, p_start, p_stop) = last_two
        gap = completion[p_stop + 1:tok]
        prev = completion[p_start:p_stop].strip()
        if len(gap) <= _JOINED_GAP and "\n" not in gap and normalize_answer(prev) != normalize_answer(extracted):
            return True
    return False


# ------------------------------------------------------------------------------- normalization

_SPACING = re.compile(r"\\[,!;: ]|\\q?quad\b|\\left\b|\\right\b|\s+")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_WORD = re.compile(r"^[A-Za-z]{2,}$")
_MAX_NUMBER_CHARS = 200  # Fraction() on longer digit strings is still fast, but there is no need


def normalize_answer(s: str) -> str:
    """A light, purely syntactic canonical form used by the fast path.

    Strips math delimiters and a trailing period, removes LaTeX spacing commands, ``\\left`` /
    ``\\right`` and all whitespace, maps ``\\dfrac``/``\\tfrac`` to ``\\frac``, unwraps a whole
    ``\\text{...}`` and drops thousands separators from plain numbers (``1,000`` -> ``1000``).
    Two answers with equal normal forms are equal; unequal forms prove nothing (math-verify
    decides).
    """
    s = _strip_wrappers(s)
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "$")
    if len(s) > 1 and s[0] == "$" and (s[1].isdigit() or s[1] == "."):  # currency: "$18" -> "18"
        s = s[1:]
    m = _TEXT_WRAP.match(s)
    if m:
        s = m.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    if len(s) > _MAX_NUMBER_CHARS or not _PLAIN_NUMBER.match(s):
        return None
    return Fraction(s)


def _fast_path(pred: str, gold: str, mode: Mode) -> bool | None:
    """True/False when the normal forms settle it, None when math-verify must decide."""
    if pred == gold:
        return True
    p, g = _as_number(pred), _as_number(gold)
    if p is not None and g is not None:
        if p == g:
            return True
        if mode == "exact" or (_INTEGER.match(pred) and _INTEGER.match(gold)):
            return False
        return None  # e.g. 0.3333333 vs 0.333333: math-verify rounds floats
    if _WORD.match(pred) and _WORD.match(gold):  # "Yes" / "yes"
        return pred.casefold() == gold.casefold()
    if mode == "exact":
        return False
    return None


# ---------------------------------------------------------------------------------- the pool

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_WORKER_MODULE = "ogls_sd.rewards.mv_worker"
# The directory that holds the ogls_sd package: the workers import this very copy of it.
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [_PKG_ROOT] + [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class _Worker:
    """One ``python -m ogls_sd.rewards.mv_worker`` subprocess and the thread reading its replies.

    Every line the worker writes (and a final ``None`` at end of file) is put on the pool's event
    queue as ``(worker, line)``.
    """

    def __init__(self, events: queue.Queue, memory_limit_mb: int | None) -> None:
        self.ready = False
        self.dead = False
        self.job: int | None = None  # index (in the current batch) of the item it is checking
        self.msg_id = -1
        self.deadline = 0.0
        self.started = time.monotonic()
        self._stderr = tempfile.TemporaryFile()
        cmd = [sys.executable or "python3", "-m", _WORKER_MODULE]
        if memory_limit_mb:
            cmd += ["--memory-limit-mb", str(int(memory_limit_mb))]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=_PKG_ROOT,  # sys.path[0] of "-m": never the caller's working directory
            env=_worker_env(),
            close_fds=True,
            start_new_session=True,  # a Ctrl-C in the terminal goes to the caller only
        )
        threading.Thread(target=self._read, args=(events,), name="verifier-reader", daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        stdout = self.proc.stdout
        try:
            for line in stdout:  # type: ignore[union-attr]
                events.put((self, line))
        except (OSError, ValueError):
            pass
        finally:
            events.put((self, None))
            try:
                stdout.close()  # type: ignore[union-attr]
            except OSError:  # pragma: no cover
                pass

    def send(self, msg_id: int, pred: str, gold: str) -> None:
        line = json.dumps({"id": msg_id, "pred": pred, "gold": gold}) + "\n"
        self.proc.stdin.write(line.encode("ascii"))  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")[-limit:].strip()
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        self.dead = True
        for step in (self.proc.kill, lambda: self.proc.wait(timeout=5.0)):
            try:
                step()
            except (OSError, subprocess.TimeoutExpired):  # pragma: no cover - already gone
                pass
        for f in (self.proc.stdin, self._stderr):
            try:
                f.close()  # type: ignore[union-attr]
            except (OSError, ValueError):  # pragma: no cover
                pass


def _kill_workers(workers: list[_Worker], owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child (at exit): the workers are its parent's
        return
    for w in workers:
        w.kill()


class _WorkerPool:
    """A fixed number of math-verify worker subprocesses, each checking one item at a time.

    A worker whose item runs past its deadline is killed and replaced at once (its replacement
    starts while the other workers keep going); the deadline of an item starts when it is written
    to an idle, started worker, so start-up time never counts against it.
    """

    def __init__(self, size: int, memory_limit_mb: int | None, start_timeout: float) -> None:
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout = start_timeout
        self.events: queue.Queue = queue.Queue()
        self.workers: list[_Worker] = []
        self.pid = os.getpid()  # a forked child must not talk to (or kill) its parent's workers
        self._finalizer = weakref.finalize(self, _kill_workers, self.workers, self.pid)
        self.sent = 0  # items written to a worker
        self.restarts = 0  # workers replaced after a timeout or a crash
        self._next_id = 0
        for _ in range(size):
            self.workers.append(_Worker(self.events, memory_limit_mb))

    def close(self) -> None:
        self._finalizer()

    def wait_ready(self) -> None:
        """Block until every worker has started (math-verify imported); RuntimeError if one can't."""
        while not all(w.ready for w in self.workers):
            wait_s = min(w.started + self.start_timeout for w in self.workers if not w.ready) - time.monotonic()
            try:
                w, line = self.events.get(timeout=max(0.0, wait_s))
            except queue.Empty:
                self._check_start_deadlines()
                continue
            if w in self.workers and not w.dead:
                self._startup_event(w, line)

    def _check_start_deadlines(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if not w.ready and now - w.started > self.start_timeout:
                raise RuntimeError(f"a verifier worker did not start within {self.start_timeout:.0f} s")

    def _startup_event(self, w: _Worker, line: bytes | None) -> None:
        msg = _decode(line)
        if line is None or (msg is not None and "ready" in msg and not msg["ready"]):
            why = (msg or {}).get("error") or w.stderr_tail() or f"exit status {w.proc.poll()}"
            raise RuntimeError(f"a verifier worker failed to start: {why}")
        if msg is not None and msg.get("ready"):
            w.ready = True

    def _replace(self, idx: int) -> None:
        self.workers[idx].kill()
        self.workers[idx] = _Worker(self.events, self.memory_limit_mb)
        self.restarts += 1

    def run(self, jobs: list[tuple[str, str]], timeout: float) -> list[tuple[bool, str]]:
        """math-verify every ``(pred, gold)`` job, each within ``timeout`` seconds of wall time."""
        out: list[tuple[bool, str] | None] = [None] * len(jobs)
        crashes = [0] * len(jobs)
        pending: deque[int] = deque(range(len(jobs)))
        while pending or any(w.job is not None for w in self.workers):
            for idx, w in enumerate(self.workers):
                if pending and w.ready and w.job is None:
                    i = pending.popleft()
                    self._next_id += 1
                    try:
                        w.send(self._next_id, *jobs[i])
                    except (OSError, ValueError):  # it died while idle: replace it, retry the item
                        pending.appendleft(i)
                        self._replace(idx)
                        continue
                    w.job, w.msg_id, w.deadline = i, self._next_id, time.monotonic() + timeout
                    self.sent += 1
            waits = [w.deadline for w in self.workers if w.job is not None]
            waits += [w.started + self.start_timeout for w in self.workers if not w.ready]
            wait_s = max(0.0, min(waits) - time.monotonic()) if waits else 0.0
            try:
                event = self.events.get(timeout=wait_s)
                while True:  # handle everything that has arrived before judging deadlines
                    self._job_event(*event, out, crashes, pending)
                    event = self.events.get_nowait()
            except queue.Empty:
                pass
            now = time.monotonic()
            for idx, w in enumerate(self.workers):
                if w.job is not None and w.deadline <= now:
                    out[w.job] = (False, "timeout")
                    w.job = None
                    self._replace(idx)
            self._check_start_deadlines()
        return [r if r is not None else (False, "error") for r in out]

    def _job_event(
        self, w: _Worker, line: bytes | None, out: list, crashes: list[int], pending: deque[int]
    ) -> None:
        if w.dead or w not in self.workers:
            return  # from a worker already killed and replaced
        if not w.ready:
            self._startup_event(w, line)
            return
        if line is None:  # the worker died (crash, OOM kill): retry its item once, then give up
            if w.job is not None:
                i, w.job = w.job, None
                crashes[i] += 1
                if crashes[i] >= 2:
                    out[i] = (False, "error")
                else:
                    pending.appendleft(i)
            self._replace(self.workers.index(w))
            return
        msg = _decode(line)
        if msg is not None and w.job is not None and msg.get("id") == w.msg_id:
            reason = msg.get("reason")
            ok = msg.get("ok") is True and reason == "ok"
            out[w.job] = (ok, reason if reason in REASONS else "error")
            w.job = None


def _decode(line: bytes | None) -> dict | None:
    if not line:
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


class Verifier:
    """Answer verification with a hard per-item time limit, usable from any thread.

    Args:
        timeout: seconds one math-verify check may take (wall clock, measured from the moment
            it is handed to an idle worker). Past it the item is ``"timeout"`` and its worker is
            killed and replaced.
        max_workers: worker processes (default ``min(4, os.cpu_count())``).
        mode: default comparison mode. ``"math"``: fast path, pre-filter, then math-verify
            (``\\frac{1}{2}`` equals ``0.5``). ``"exact"``: only the fast path (normalized string or
            exact numeric equality), e.g. for tasks with integer answers; never starts a worker.
        max_answer_chars: extracted (or gold) answers longer than this are ``"too_long"``.
        memory_limit_mb: address-space cap per worker (POSIX ``RLIMIT_AS``); None disables it.
        start_timeout: seconds allowed for starting a worker (importing math-verify).
        prefilter: reject answers that are too costly for math-verify (``"too_complex"``, see
            :mod:`ogls_sd.rewards.prefilter`) without contacting a worker. Switch it off only to
            exercise the deadline.

    The workers (``python -m ogls_sd.rewards.mv_worker`` subprocesses; nothing is re-imported
    from the caller's ``__main__``) are started lazily on the first item that needs math-verify.
    Calls from several threads are serialized by a lock. Call :meth:`close` (or use the verifier
    as a context manager) to stop the workers; they also stop when the caller exits.
    """

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        max_workers: int | None = None,
        mode: Mode = "math",
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        memory_limit_mb: int | None = 4096,
        start_timeout: float = 120.0,
        prefilter: bool = True,
    ) -> None:
        timeout = checked_timeout(timeout)
        if mode not in ("math", "exact"):
            raise ValueError(f"unknown mode {mode!r} (expected 'math' or 'exact')")
        self.timeout = timeout
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.mode: Mode = mode
        self.max_answer_chars = int(max_answer_chars)
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout = float(start_timeout)
        self.prefilter = bool(prefilter)
        self._pool: _WorkerPool | None = None
        self._lock = threading.RLock()
        self.restarts = 0  # workers replaced after a timeout or crash (for diagnostics)
        self.jobs_sent = 0  # items handed to a math-verify worker (for diagnostics)

    # -- public API ------------------------------------------------------------------------
    def verify(self, completion: str, gold: str, mode: Mode | None = None) -> VerifyResult:
        """Verify one completion against one gold answer (see :meth:`verify_batch`)."""
        return self.verify_batch([completion], [gold], mode=mode)[0]

    def verify_batch(
        self, completions: Sequence[str], golds: Sequence[str], mode: Mode | None = None
    ) -> list[VerifyResult]:
        """Verify ``completions[i]`` against ``golds[i]`` for every i.

        Contract: returns one :class:`VerifyResult` per item, in order; never raises for any
        ``str`` input (non-strings are treated as having no answer); each item that needs
        math-verify takes at most about ``timeout`` seconds of wall time once it has started.

        Raises:
            ValueError: the two sequences differ in length, or ``mode`` is unknown.
            RuntimeError: the worker processes cannot be started at all (e.g. math-verify is not
                importable by ``sys.executable``).
        """
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        mode = mode or self.mode
        if mode not in ("math", "exact"):
            raise ValueError(f"unknown mode {mode!r} (expected 'math' or 'exact')")
        results: list[VerifyResult] = []
        jobs: list[tuple[int, str, str]] = []  # (index, extracted, gold) for math-verify
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            decided, job = self._precheck(completion, gold, mode)
            results.append(decided if decided is not None else VerifyResult(False, "error", None))
            if job is not None:
                jobs.append((i, job[0], job[1]))
        if jobs:
            outcomes = self._run_jobs([(pred, gold) for _, pred, gold in jobs])
            for (i, pred, _), (ok, reason) in zip(jobs, outcomes):
                results[i] = VerifyResult(ok, reason, pred)
        return results

    def close(self) -> None:
        """Stop the worker processes. The verifier may still be used (it restarts lazily)."""
        with self._lock:
            self._kill_pool()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _precheck(
        self, completion: object, gold: object, mode: Mode
    ) -> tuple[VerifyResult | None, tuple[str, str] | None]:
        extracted = extract_answer(completion) if isinstance(completion, str) else None
        if extracted is None:
            return VerifyResult(False, "no_answer", None), None
        if len(extracted) > self.max_answer_chars:
            return VerifyResult(False, "too_long", extracted), None
        gold_s = "" if gold is None else str(gold)
        if len(gold_s) > self.max_answer_chars:
            return VerifyResult(False, "too_long", extracted), None
        if is_hedge(completion, extracted, gold_s):  # several values offered: never scores
            return VerifyResult(False, "hedge", extracted), None
        pred_n, gold_n = normalize_answer(extracted), normalize_answer(gold_s)
        if not gold_n:
            return VerifyResult(False, "parse_error", extracted), None
        if not pred_n:
            return VerifyResult(False, "no_answer", extracted), None
        fast = _fast_path(pred_n, gold_n, mode)
        if fast is True:
            return VerifyResult(True, "ok", extracted), None
        if fast is False:
            return VerifyResult(False, "wrong", extracted), None
        if self.prefilter:
            why = reject_reason(pred_n)
            if why is not None:
                logger.debug("answer rejected before math-verify (%s): %.80r", why, extracted)
                return VerifyResult(False, "too_complex", extracted), None
        return None, (extracted, gold_s)

    def _ensure_pool(self) -> _WorkerPool:
        if self._pool is not None and self._pool.pid != os.getpid():  # we are a forked child
            self._kill_pool()  # forgets the parent's workers without touching them
        if self._pool is None:
            pool = _WorkerPool(self.max_workers, self.memory_limit_mb, self.start_timeout)
            try:
                pool.wait_ready()  # start every worker before any deadline is counted
            except BaseException:
                pool.close()
                raise
            self._pool = pool
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()  # a no-op in a forked child: the workers are its parent's

    def _run_jobs(self, jobs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        """Run math-verify on every job with a per-job deadline; see the class docstring."""
        with self._lock:
            pool = self._ensure_pool()
            sent, restarts = pool.sent, pool.restarts
            try:
                return pool.run(jobs, self.timeout)
            except BaseException:  # a worker could not be (re)started, or KeyboardInterrupt
                self._kill_pool()
                raise
            finally:
                self.jobs_sent += pool.sent - sent
                self.restarts += pool.restarts - restarts


# ------------------------------------------------------------------------- module-level helpers

_default: Verifier | None = None
_default_lock = threading.Lock()


def get_default_verifier() -> Verifier:
    """The process-wide :class:`Verifier` used by :func:`verify` (created lazily, closed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Verifier()
            atexit.register(_default.close)
        return _default


MAX_TIMEOUT = 86400.0  # a day: a longer deadline is no deadline (and inf overflows the pipe waits)


def checked_timeout(timeout: object) -> float:
    """``timeout`` as seconds: a finite number in (0, MAX_TIMEOUT]; anything else is a ValueError
    naming it (``inf`` used to overflow, ``0`` / ``-1`` to grade everything "timeout", ``nan``
    to switch the deadline off)."""
    try:
        t = float(timeout)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"timeout: expected a number of seconds, got {timeout!r}") from None
    if not 0 < t <= MAX_TIMEOUT:  # False for nan
        raise ValueError(f"timeout: must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
    return t


def verify(completion: str, gold: str, timeout: float = DEFAULT_TIMEOUT, mode: Mode = "math") -> VerifyResult:
    """Verify one completion against a gold answer with the shared default verifier.

    ``timeout`` bounds the math-verify check of this call (seconds); see :class:`Verifier`.
    """
    v = get_default_verifier()
    with v._lock:
        saved = v.timeout
        v.timeout = checked_timeout(timeout)
        try:
            return v.verify(completion, gold, mode=mode)
        finally:
            v.timeout = saved


def verify_batch(
    completions: Sequence[str], golds: Sequence[str], timeout: float = DEFAULT_TIMEOUT, mode: Mode = "math"
) -> list[VerifyResult]:
    """Batch form of :func:`verify` (shared default verifier)."""
    v = get_default_verifier()
    with v._lock:
        saved = v.timeout
        v.timeout = checked_timeout(timeout)
        try:
            return v.verify_batch(completions, golds, mode=mode)
        finally:
            v.timeout = saved


def boxed_answer(text: str) -> str:
    """The answer a worked solution states: the content of its last non-empty outermost
    ``\\boxed{}`` (the rule :func:`extract_answer` grades by). Raises ``ValueError`` when there is
    none or when that box holds another box (a hedge): ``data.answer_from=reference_boxed``."""
    box = _last_outermost_box(text)
    if box is None or not box.strip():
        raise ValueError("no \\boxed{} answer in the reference")
    if "\\boxed" in box or "\\fbox" in box:
        raise ValueError("the last \\boxed{} of the reference holds another box (a hedge)")
    return box.strip()

