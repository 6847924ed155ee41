"""Final-answer extraction and answer verification for math-style reasoning tasks.

Two layers:

* :func:`extract_answer` pulls the final answer out of a completion. It is pure Python, runs in
  linear time on any input (a 1 MB string, 100k nested braces) and never recurses.
* :class:`Verifier` decides whether an extracted answer equals a gold answer. Cheap cases
  (no answer, over-long answer, identical strings, equal or unequal integers) are decided in the
  calling process; everything else goes to `math-verify <https://github.com/huggingface/Math-Verify>`_
  (``math_verify.parse`` / ``math_verify.verify``) in a worker process of a
  :class:`concurrent.futures.ProcessPoolExecutor`. math-verify's own timeout uses
  ``signal.alarm``, which only works in the main thread, so it is switched off
  (``parsing_timeout=None``, ``timeout_seconds=None``) and the limit is enforced here instead: a
  check that runs past ``timeout`` seconds is reported as ``"timeout"`` and the worker running it
  is killed, so a pathological answer such as ``9^{9^{9^9}}`` can never hang the caller. A
  ``Verifier`` can be used from any thread. Model output is never passed to ``eval``.

Result reasons (:attr:`VerifyResult.reason`):

``"ok"``           the answer is correct.
``"wrong"``        an answer was found and parsed, and it is not equivalent to the gold answer.
``"no_answer"``    no final answer could be extracted from the completion.
``"too_long"``     the extracted answer (or the gold answer) is longer than ``max_answer_chars``.
``"parse_error"``  math-verify could not parse the extracted answer (or the gold answer).
``"timeout"``      the equivalence check ran past the time limit (its worker was killed).
``"error"``        the worker process died (e.g. out of memory) twice on this item.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

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
REASONS = ("ok", "wrong", "no_answer", "too_long", "parse_error", "timeout", "error")

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

    1. the content of the last complete, non-empty ``\\boxed{...}`` or ``\\fbox{...}``, with
       proper (nested) brace matching; escaped braces ``\\{``/``\\}`` are literal;
    2. else the rest of the line after the last ``#### `` (GSM8K style);
    3. else the value after the last ``Answer: X`` / ``answer is X`` (case-insensitive; markdown
       bold, ``$...$``, ``\\(...\\)``, ``\\[...\\]`` and a trailing period are stripped).

    Contract: runs in time linear in ``len(text)`` (a bounded number of passes, no recursion, no
    backtracking regexes), never raises on a ``str``, and returns a stripped, non-empty string or
    None. The result is not length-capped; :class:`Verifier` rejects over-long answers.
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_box_iterative(text)
    if boxed is not None:
        return boxed
    hashes = _last_hashes(text)
    if hashes is not None:
        return hashes
    return _last_answer_marker(text)


def _last_box_iterative(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}``, or None.

    "Last" means the box whose closing brace comes last (for nested boxes, the outer one). An empty
    box (e.g. an echoed "put your answer in \\boxed{}") is skipped in favour of an earlier one.
    """
    end = len(text)
    # Each iteration scans text[:end]; the number of iterations is the number of trailing *empty*
    # boxes, which a normal completion has at most one or two of. Cap it to stay linear-ish.
    for _ in range(8):
        found = _find_last_box_span(text, end)
        if found is None:
            return None
        start, stop, box_start = found
        content = text[start:stop].strip()
        if content:
            return content
        end = box_start
        if end <= 0:
            return None
    return None


def _find_last_box_span(text: str, end: int) -> tuple[int, int, int] | None:
    """(content start, content end, box token start) of the box in ``text[:end]`` closing last."""
    if text.find("\\boxed", 0, end) < 0 and text.find("\\fbox", 0, end) < 0:
        return None
    stack: list[tuple[int, int]] = []  # (content start, token start); content start -1: plain "{"
    best: tuple[int, int, int] | None = None
    for m in _BRACE_TOKENS.finditer(text, 0, end):
        tok = m.group()
        if len(tok) == 2 and tok[0] == "\\":  # escaped brace
            continue
        if tok == "}":
            if stack:
                start, tok_start = stack.pop()
                if start >= 0:
                    best = (start, m.start(), tok_start)
            continue
        if tok[0] == "\\":
            stack.append((m.end(), m.start()))
        else:
            stack.append((-1, -1))
    return best


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


# ---------------------------------------------------------------------------------- worker side

def _worker_init(memory_limit_mb: int | None) -> None:
    """Runs once in each worker: optional address-space cap, import and quiet math-verify."""
    if memory_limit_mb:
        try:
            import resource

            limit = int(memory_limit_mb) * 1024 * 1024
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
            pass
    import math_verify.grader as grader
    import math_verify.parser as parser

    # We enforce the time limit ourselves (process kill); silence the "timeout disabled" warning.
    grader.TIMEOUT_WARNING_SHOWN = True
    parser.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _worker_ping() -> int:
    return os.getpid()


def _mv_wrap(answer: str) -> str:
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def _worker_check(pred: str, gold: str) -> tuple[bool, str]:
    """Compare two extracted answers with math-verify (runs in a worker process)."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    try:
        gold_parsed = parse(_mv_wrap(gold), parsing_timeout=None)
        if not gold_parsed:
            return False, "parse_error"
        pred_parsed = parse(_mv_wrap(pred), parsing_timeout=None)
        if not pred_parsed:
            return False, "parse_error"
        ok = mv_verify(gold_parsed, pred_parsed, timeout_seconds=None)
    except MemoryError:
        return False, "error"
    except Exception:  # noqa: BLE001 - math-verify/sympy can raise anything on odd input
        return False, "parse_error"
    return (True, "ok") if ok else (False, "wrong")


# ---------------------------------------------------------------------------------- the pool


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (cheap restarts; safe with threads in the parent), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        try:
            # Only effective if the fork server has not started yet; harmless otherwise.
            ctx.set_forkserver_preload(["math_verify", __name__])
        except Exception:  # pragma: no cover
            pass
        return ctx
    return multiprocessing.get_context("spawn")


class Verifier:
    """Answer verification with a hard per-item time limit, usable from any thread.

    Args:
        timeout: seconds one math-verify check may take (wall clock, measured from the moment
            it is handed to an idle worker). Past it the item is ``"timeout"`` and the workers are
            killed and restarted.
        max_workers: worker processes (default ``min(4, os.cpu_count())``).
        mode: default comparison mode. ``"math"``: fast path, then math-verify (``\\frac{1}{2}``
            equals ``0.5``). ``"exact"``: only the fast path (normalized string or exact numeric
            equality), e.g. for tasks with integer answers; never starts a worker.
        max_answer_chars: extracted (or gold) answers longer than this are ``"too_long"``.
        memory_limit_mb: address-space cap per worker (POSIX ``RLIMIT_AS``); None disables it.
        start_timeout: seconds allowed for (re)starting the worker pool.

    The pool is created lazily on the first item that needs math-verify, and restarted after a
    timeout or a worker crash. Calls from several threads are serialized by a lock. Call
    :meth:`close` (or use the verifier as a context manager) to stop the workers.
    """

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        max_workers: int | None = None,
        mode: Mode = "math",
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        memory_limit_mb: int | None = 4096,
        start_timeout: float = 120.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if mode not in ("math", "exact"):
            raise ValueError(f"unknown mode {mode!r} (expected 'math' or 'exact')")
        self.timeout = float(timeout)
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.mode: Mode = mode
        self.max_answer_chars = int(max_answer_chars)
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout = float(start_timeout)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.restarts = 0  # pool restarts after a timeout or crash (for diagnostics)

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
            RuntimeError: the worker processes cannot be started at all (e.g. the main script
                cannot be re-imported by ``multiprocessing``).
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
        return None, (extracted, gold_s)

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is not None:
            return self._pool
        pool = ProcessPoolExecutor(
            max_workers=self.max_workers,
            mp_context=_mp_context(),
            initializer=_worker_init,
            initargs=(self.memory_limit_mb,),
        )
        # Warm up: start every worker (and import math-verify) before any deadline is counted.
        pings = [pool.submit(_worker_ping) for _ in range(self.max_workers)]
        done, not_done = wait(pings, timeout=self.start_timeout)
        errors = [f.exception() for f in done if f.exception() is not None]
        if not_done or errors:
            _kill_executor(pool)
            why = f"failed: {errors[0]!r}" if errors else f"did not start within {self.start_timeout:.0f} s"
            raise RuntimeError(f"the verifier worker pool {why}")
        self._pool = pool
        return pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            _kill_executor(pool)

    def _run_jobs(self, jobs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        """Run math-verify on every job with a per-job deadline; see the class docstring."""
        with self._lock:
            out: list[tuple[bool, str] | None] = [None] * len(jobs)
            crashes = [0] * len(jobs)
            pending: deque[int] = deque(range(len(jobs)))
            inflight: dict[Future, tuple[int, float]] = {}
            while pending or inflight:
                pool = self._ensure_pool()
                # At most one job per worker: a submitted job starts at once, so its deadline is fair.
                while pending and len(inflight) < self.max_workers:
                    i = pending.popleft()
                    try:
                        fut = pool.submit(_worker_check, *jobs[i])
                    except Exception:  # broken pool: restart and retry
                        pending.appendleft(i)
                        self._restart(inflight, pending, out)
                        pool = self._ensure_pool()
                        continue
                    inflight[fut] = (i, time.monotonic() + self.timeout)
                if not inflight:
                    continue
                next_deadline = min(d for _, d in inflight.values())
                done, _ = wait(
                    list(inflight), timeout=max(0.0, next_deadline - time.monotonic()), return_when=FIRST_COMPLETED
                )
                broken = False
                for fut in done:
                    i, _ = inflight.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        out[i] = fut.result()
                    else:  # the worker died (crash, OOM kill): retry once, then give up
                        broken = True
                        crashes[i] += 1
                        if crashes[i] >= 2:
                            out[i] = (False, "error")
                        else:
                            pending.appendleft(i)
                now = time.monotonic()
                expired = [f for f, (_, d) in inflight.items() if d <= now and not f.done()]
                for fut in expired:
                    i, _ = inflight.pop(fut)
                    out[i] = (False, "timeout")
                if expired or broken:
                    self._restart(inflight, pending, out)
            return [r if r is not None else (False, "error") for r in out]

    def _restart(
        self, inflight: dict[Future, tuple[int, float]], pending: deque[int], out: list[tuple[bool, str] | None]
    ) -> None:
        """Kill the pool; keep finished results of in-flight jobs and requeue the others."""
        for fut, (i, _) in list(inflight.items()):
            if fut.done() and fut.exception() is None:
                out[i] = fut.result()
            else:
                pending.appendleft(i)
        inflight.clear()
        self._kill_pool()
        self.restarts += 1


def _kill_executor(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's workers now (running tasks included) and shut it down without waiting."""
    kill = getattr(pool, "kill_workers", None)  # Python >= 3.14
    procs = list((getattr(pool, "_processes", None) or {}).values())
    if callable(kill):
        try:
            kill()
        except Exception:  # pragma: no cover
            pass
    for p in procs:
        try:
            p.kill()
        except Exception:  # pragma: no cover - already gone
            pass
    try:
        pool.shutdown(wait=False, cancel_futures=True)
    except Exception:  # pragma: no cover
        pass
    for p in procs:
        try:
            p.join(timeout=2.0)
        except Exception:  # pragma: no cover
            pass


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


def verify(completion: str, gold: str, timeout: float = DEFAULT_TIMEOUT, mode: Mode = "math") -> VerifyResult:
    """Verify one completion against a gold answer with the shared default verifier.

    ``timeout`` bounds the math-verify check of this call (seconds); see :class:`Verifier`.
    """
    v = get_default_verifier()
    with v._lock:
        saved = v.timeout
        v.timeout = float(timeout)
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
        v.timeout = float(timeout)
        try:
            return v.verify_batch(completions, golds, mode=mode)
        finally:
            v.timeout = saved
