"""Worker process of :class:`ogls_sd.rewards.verifier.Verifier`: math-verify behind a pipe.

Started by the verifier as ``python -m ogls_sd.rewards.mv_worker [--memory-limit-mb N]`` (a plain
subprocess, never ``multiprocessing``), so it does not re-import the caller's ``__main__``:
``verify()`` works from a script without an ``if __name__ == "__main__":`` guard, from
``python -`` and from notebooks.

Protocol (JSON lines; stdin requests, stdout replies, one reply per request, in order):

* on start-up, after the address-space cap is set and math-verify is imported and warmed up, the
  worker writes ``{"ready": <pid>}`` (or ``{"ready": false, "error": "..."}`` and exits 1);
* request ``{"id": <int>, "pred": <str>, "gold": <str>}`` -> reply
  ``{"id": <int>, "ok": <bool>, "reason": "ok" | "wrong" | "parse_error" | "error"}``;
* end of stdin: the worker exits 0.

The worker enforces no time limit itself: math-verify's own timeouts (``signal.alarm``) stay off,
and the parent kills a worker whose item runs past the deadline and starts a new one. The
protocol is written to a private copy of the original stdout; file descriptors 1 and 2 point to
``/dev/null`` once the worker is ready, so nothing printed by sympy or math-verify can corrupt it.
The worker also exits when its parent process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time


def set_memory_limit(memory_limit_mb: int | None) -> None:
    """Cap this process's address space (POSIX ``RLIMIT_AS``); a no-op where unsupported."""
    if not memory_limit_mb:
        return
    try:
        import resource

        limit = int(memory_limit_mb) * 1024 * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
        pass


def quiet_math_verify() -> None:
    """Import math-verify and silence its "timeout disabled" warnings (we kill instead)."""
    import math_verify.grader as grader
    import math_verify.parser as parser

    grader.TIMEOUT_WARNING_SHOWN = True
    parser.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)


def _mv_wrap(answer: str) -> str:
    # A prediction never contains \boxed here (a box inside the graded box is a hedge, rejected
    # before); a gold answer stored as "\boxed{5}" is passed as it is.
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def check(pred: str, gold: str) -> tuple[bool, str]:
    """Compare two extracted answers with math-verify.

    The prediction is parsed with ``extraction_mode="first_match"``: its box content is graded as a
    whole, and if that does not parse, math-verify may *not* fall back to a sub-expression (with
    ``"any_match"``, ``12 \\lor 13`` parses as ``13`` and a two-answer hedge would score).
    """
    from math_verify import parse
    from math_verify import verify as mv_verify

    try:
        gold_parsed = parse(_mv_wrap(gold), parsing_timeout=None)
        if not gold_parsed:
            return False, "parse_error"
        pred_parsed = parse(_mv_wrap(pred), parsing_timeout=None, extraction_mode="first_match")
        if not pred_parsed:
            return False, "parse_error"
        ok = mv_verify(gold_parsed, pred_parsed, timeout_seconds=None)
    except MemoryError:
        return False, "error"
    except Exception:  # noqa: BLE001 - math-verify/sympy can raise anything on odd input
        return False, "parse_error"
    return (True, "ok") if ok else (False, "wrong")


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the parent is gone (re-parented), even while stdin stays open."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    memory_limit_mb = None
    if len(argv) >= 2 and argv[0] == "--memory-limit-mb":
        memory_limit_mb = int(argv[1]) or None
    # The protocol goes to a private copy of stdout; stray prints go to stderr for now.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    set_memory_limit(memory_limit_mb)
    try:
        quiet_math_verify()
        check("\\frac{1}{2}", "0.5")  # warm up: lazy imports and parser construction
    except BaseException as e:  # noqa: BLE001 - report whatever prevented start-up
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    # From here on, nothing but the protocol: fds 1 and 2 go to /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    send({"ready": os.getpid()})
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw.decode("utf-8", "replace"))
            job_id, pred, gold = req["id"], req["pred"], req["gold"]
        except Exception:  # noqa: BLE001 - a malformed request: skip it
            continue
        ok, reason = check(str(pred), str(gold))
        send({"id": job_id, "ok": ok, "reason": reason})
    return 0


if __name__ == "__main__":
    sys.exit(main())
