"""Warm start of the built-in tiny model: a short SFT so that it solves some problems alone and has
learned to read every context template the algorithms use.

The SFT mix (fractions from ``warmstart``), with ``y*`` the privileged reference and ``ŷ`` the
same solution in the student's own style (``task.plain_reference``; ``ŷ = y*`` unless the task
writes its references in another template, as ``arith_style=templated`` does):

* student format: ``student_prompt(x) -> ŷ``;
* privileged format: ``teacher_prompt(x, y*) -> y*`` (the model learns to use a reference — and,
  when ``y*`` is templated, to reproduce its template: the teacher "drifts toward that template");
* earlier-attempt format (OGLS-SD context pooling): ``context_prompt(x, a) -> ŷ`` where the
  attempt ``a`` is right (``ŷ``) or wrong (``task.wrong_attempt``: a plausible slip — a dropped or
  invented carry, a column sum off by one, a digit mis-assembled in the answer — written in the
  student's style) with equal probability. The target is always the correct solution, so the
  model learns to *repair* a wrong attempt, not to copy it.

Two mixes share one stream of problems. The *student mix* (``student_fraction`` student format)
runs until a check finds the student's greedy accuracy at ``warmstart.target_accuracy``; from then
on the *reading mix* gives most of the student share to the earlier-attempt format
(``reading_student_fraction``), so the model keeps learning to read an attempt in context while the
student stays near its target. A later check that finds the student below the target switches back.
Checks run every ``warmstart.check_every`` steps on ``warmstart.check_size`` validation problems:
the student format always, ``context_correct`` once the student has reached its target. Training
stops at the first check where both hold (:func:`warm_start_done`): the student is in its band
``[target_accuracy, student_max]`` and ``context_correct >= context_target``; at the latest after
``warmstart.steps``. A warm start that reaches the cap without such a check returns the weights of
the in-band check with the highest ``context_correct`` (``stopped = best_in_band``; weights kept
in memory at each new best), so the student stays in its band; only with no in-band check at all
does the model of the last step stand (``stopped = cap``). At the end the greedy accuracy of every format is measured on the same
validation problems (:func:`format_accuracies`: student, privileged, context with a correct attempt,
context with a wrong attempt), each with a token budget derived from the reference it must
reproduce (:func:`format_budget`), printed, and stored in ``warmstart.json`` next to the weights
with the checks, the wall time and why training stopped.

The result is cached under ``warmstart.cache_dir/<hash>`` (hash of everything that determines it)
and loaded from there on later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

from .accuracy import evaluate_accuracy
from .checkpoint import sha256_file
from .config import Config
from .data.example import Example
from .templates import PromptBuilder
from .tiny import char_tokenizer, tiny_llama

CACHE_VERSION = 4  # 2: stops on an accuracy target, records per-format accuracies, varied wrong attempts;
# 3: student band and context_correct target, reading mix, per-format budgets; 4: best in-band check at the cap


def cache_key(cfg: Config, data_fingerprint: str = "") -> str:
    """The warm start's cache directory name. ``data_fingerprint``: a hash of training rows given in
    memory (the Python API's ``data=``), which ``data.task`` does not describe."""
    d = cfg.to_dict()
    keep = {
        "v": CACHE_VERSION,
        "model": {k: v for k, v in d["model"].items() if k.startswith("tiny_") or k == "name"},
        "data": {k: v for k, v in d["data"].items() if k.startswith("arith_") or k in ("task", "seed")},
        "warmstart": {k: v for k, v in d["warmstart"].items() if k != "cache_dir"},
        "templates": d["templates"],
        "seed": d["train"]["seed"],
    }
    ws = keep["warmstart"]
    if ws["reading_context_correct_share"] == ws["context_correct_share"]:  # the mix before the field existed:
        del ws["reading_context_correct_share"]  # caches built then stay valid
    if keep["data"].get("arith_style", "plain") == "plain":  # caches made before the style existed stay valid
        keep["data"].pop("arith_style", None)
    if data_fingerprint:
        keep["data"]["rows"] = data_fingerprint

    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def plain_reference(task, ex: Example) -> str:
    """``ex``'s solution in the student's own style (:meth:`~ogls_sd.tasks.base.Task.plain_reference`;
    the reference itself unless the task writes its references in another style)."""
    return task.plain_reference(ex)


def sft_pairs(task, prompts: PromptBuilder, examples: list[Example], cfg: Config, rng: random.Random,
              reading: bool = False):
    """Yield ``(kind, prompt_ids, target_ids)`` of the warm-start mix; kind is student|privileged|context.
    ``reading``: the reading mix (``reading_student_fraction`` and ``reading_context_correct_share``
    instead of ``student_fraction`` and ``context_correct_share``)."""
    ws = cfg.warmstart
    student = ws.reading_student_fraction if reading else ws.student_fraction
    correct_share = ws.reading_context_correct_share if reading else ws.context_correct_share
    for ex in examples:
        plain = plain_reference(task, ex)
        u = rng.random()
        if u < student:
            kind, p, sol = "student", prompts.student_ids(ex), plain
        elif u < student + ws.reference_fraction:
            kind, p, sol = "privileged", prompts.teacher_ids(ex), ex.reference  # templated stays templated
        else:
            attempt = plain if rng.random() < correct_share else task.wrong_attempt(ex, rng)
            kind, sol = "context", plain
            p = prompts.context_ids(ex, prompts.text_ids(attempt), cfg.steering.max_context_tokens)
        yield kind, p, prompts.text_ids(sol) + [prompts.eos_id]


FORMATS = ("student", "privileged", "context_correct", "context_wrong")
TEMPLATE_OF = {"student": "student", "privileged": "teacher", "context_correct": "context", "context_wrong": "context"}


def student_reached(acc: dict[str, float], ws) -> bool:
    """Whether a check's student accuracy has reached ``ws.target_accuracy`` (then the reading mix
    is used and ``context_correct`` is measured)."""
    return acc["student"] >= ws.target_accuracy


def in_band(acc: dict[str, float], ws) -> bool:
    """Whether a check's student accuracy is in its band ``[target_accuracy, student_max]``."""
    return ws.target_accuracy <= acc["student"] <= ws.student_max


def warm_start_done(acc: dict[str, float], ws) -> bool:
    """The stopping rule: the student is in its band ``[target_accuracy, student_max]`` and, when
    ``ws.context_target > 0``, ``context_correct`` (which must then be in ``acc``) reaches it."""
    return in_band(acc, ws) and (ws.context_target <= 0 or acc["context_correct"] >= ws.context_target)


def warmstart_lr(step: int, reading: bool, ws) -> float:
    """Learning rate of SFT step ``step`` (1-based): ``ws.lr`` after 20 linear warm-up steps, times
    ``ws.reading_lr_scale`` in the reading mix (consolidates what the student mix taught)."""
    return ws.lr * min(1.0, step / 20) * (ws.reading_lr_scale if reading else 1.0)


def checks_enabled(ws) -> bool:
    """Checks run when either target is set; with both 0 the warm start always runs ``ws.steps``."""
    return ws.target_accuracy > 0 or ws.context_target > 0


def format_budget(task, prompts: PromptBuilder, examples: list[Example], fmt: str) -> int:
    """Generation budget of ``fmt`` in :func:`format_accuracies`: the tokens of the longest solution
    the format must reproduce, plus EOS — the privileged reference (templated under
    ``arith_style=templated``) for ``privileged``, the student-style solution for the others."""
    sols = [ex.reference if fmt == "privileged" else plain_reference(task, ex) for ex in examples]
    return max(len(prompts.text_ids(s)) for s in sols) + 1


def validation_examples(task, cfg: Config) -> list[Example]:
    """The warm start's validation problems: the test split under a seed of their own (disjoint
    from the training stream; a different draw from the held-out evaluation set)."""
    return task.examples(cfg.warmstart.check_size, seed=cfg.data.seed * 100003 + 7_777_777, split="test")


@torch.no_grad()
def format_accuracies(model, tok, prompts: PromptBuilder, task, examples: list[Example], cfg: Config,
                      formats: tuple[str, ...] = FORMATS) -> dict[str, float]:
    """Greedy accuracy of ``model`` in each prompt format of the warm-start mix.

    ``student``: the problem alone; ``privileged``: the problem with the reference (``teacher``
    template); ``context_correct`` / ``context_wrong``: the context template with the correct
    student-style solution / a :meth:`wrong_attempt` as the earlier attempt (one fixed wrong attempt
    per problem, seeded). Each format's generation budget is :func:`format_budget` (the length of
    the reference it must reproduce). Each format is scored by
    :func:`ogls_sd.accuracy.evaluate_accuracy` (same context check, same grading).
    """
    rng = random.Random(f"warmstart/check/{cfg.data.seed}")
    out = {}
    for fmt in formats:
        if fmt == "student":
            ps = [prompts.student_ids(ex) for ex in examples]
        elif fmt == "privileged":
            ps = [prompts.teacher_ids(ex) for ex in examples]
        else:
            attempts = [plain_reference(task, ex) if fmt == "context_correct" else task.wrong_attempt(ex, rng)
                        for ex in examples]
            ps = [prompts.context_ids(ex, prompts.text_ids(a), cfg.steering.max_context_tokens)
                  for ex, a in zip(examples, attempts)]
        n = format_budget(task, prompts, examples, fmt)
        out[fmt] = evaluate_accuracy(model, tok, prompts, task, examples, n, cfg.eval.batch_size,
                                     prompt_ids=ps, kind=TEMPLATE_OF[fmt], where="warm-start check example",
                                     setting="the warm-start budget").accuracy
    return out


def read_record(path: Path) -> dict:
    """The ``warmstart.json`` of a cached warm start (``{}`` when absent or unreadable)."""
    try:
        return json.loads((Path(path) / "warmstart.json").read_text())
    except (OSError, ValueError):
        return {}


def describe(record: dict) -> str:
    """One line: steps and per-format greedy accuracies of a warm start record."""
    acc = record.get("accuracy") or {}
    parts = [f"{k} {100 * acc[k]:.1f}%" for k in FORMATS if k in acc]
    return f"warm start: {record.get('steps', '?')} steps; greedy accuracy " + ", ".join(parts)


def clean_stale_temporaries(cache_dir: Path) -> list[Path]:
    """Remove ``<key>.tmp<PID>`` directories left by a warm start that was killed while saving
    (their process is gone, and they are over a minute old: a temporary lives for the seconds of a
    save); returns what was removed. A live process's temporary is kept."""
    removed = []
    if not cache_dir.is_dir():
        return removed
    for d in cache_dir.iterdir():
        m = re.fullmatch(r".+\.tmp(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        pid = int(m.group(1))
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        old = time.time() - d.stat().st_mtime > 60  # not one being renamed this second (another node's)
        if old and (pid == os.getpid() or not alive):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _say(progress, msg: str) -> None:
    """Print ``msg`` above the progress display (or plainly without one)."""
    console = getattr(progress, "console", None)
    if console is not None:
        console.print(msg, highlight=False)
    else:
        print(msg, flush=True)


def _batch(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """``(input_ids, attention_mask, labels)`` of right-padded prompt+target pairs (loss on targets only)."""
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    att = torch.zeros((len(pairs), width), dtype=torch.long)
    for r, (p, t) in enumerate(pairs):
        seq = p + t
        ids[r, : len(seq)] = torch.tensor(seq)
        att[r, : len(seq)] = 1
        labels[r, len(p) : len(seq)] = torch.tensor(t)
    return ids, att, labels


def sft_loss(model, groups: list[list[tuple[list[int], list[int]]]], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL over every target token of ``groups`` (lists of prompt+target pairs),
    each group padded only to its own longest sequence: the same loss as one batch of all pairs
    (``model(labels=...).loss``), without computing the padding of short formats to the longest."""
    total = sum(len(t) for g in groups for _, t in g)
    loss = 0.0
    for g in groups:
        ids, att, labels = _batch(g, pad_id)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        loss = loss + torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    return loss / total


def _check(model, tok, prompts, task, val, cfg: Config) -> dict[str, float]:
    """One check: the student's accuracy, and ``context_correct`` once the student has reached its
    target (and ``warmstart.context_target > 0``)."""
    ws = cfg.warmstart
    acc = format_accuracies(model, tok, prompts, task, val, cfg, formats=("student",))
    if ws.context_target > 0 and student_reached(acc, ws):
        acc.update(format_accuracies(model, tok, prompts, task, val, cfg, formats=("context_correct",)))
    model.train()
    return acc


def _describe_check(step: int, acc: dict[str, float], ws) -> str:
    cc = f", context_correct {100 * acc['context_correct']:.1f}% (target {100 * ws.context_target:.0f}%)" \
        if "context_correct" in acc else ""
    return (f"warm start: step {step}/{ws.steps}, student greedy accuracy {100 * acc['student']:.1f}% "
            f"(band {100 * ws.target_accuracy:.0f}-{100 * ws.student_max:.0f}%){cc}, "
            f"{acc.get('cpu_s', 0):.0f} CPU s")


def _train(model, tok, prompts, task, cfg: Config, progress) -> tuple[int, list[dict], str]:
    """The SFT loop with its checks; returns ``(steps, checks, stopped)``, ``stopped`` = target | cap."""
    ws = cfg.warmstart
    val = validation_examples(task, cfg)
    rng = random.Random(f"warmstart/{cfg.train.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    task_id = progress.add_task("warm start (SFT)", total=ws.steps, info="") if progress else None
    checks: list[dict] = []
    reading = False
    best = None  # (step, context_correct, weights) of the best in-band check, the fallback at the cap
    t0, c0 = time.time(), time.process_time()
    for step in range(1, ws.steps + 1):
        exs = task.examples(ws.batch_size, seed=cfg.data.seed * 100003 + step - 1 + 1_000_000, split="train")
        for group in opt.param_groups:
            group["lr"] = warmstart_lr(step, reading, ws)
        by_kind: dict[str, list] = {}
        for kind, p, t in sft_pairs(task, prompts, exs, cfg, rng, reading=reading):
            by_kind.setdefault(kind, []).append((p, t))
        loss = sft_loss(model, list(by_kind.values()), tok.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress:
            progress.update(task_id, advance=1, description=f"warm start (SFT) loss {loss.item():.3f}")
        if checks_enabled(ws) and step % ws.check_every == 0 and step < ws.steps:
            acc = _check(model, tok, prompts, task, val, cfg)
            checks.append({"step": step, "mix": "reading" if reading else "student", **acc,
                           "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)})
            _say(progress, _describe_check(step, checks[-1], ws))
            if warm_start_done(acc, ws):
                return step, checks, "target"
            if in_band(acc, ws) and (best is None or acc["context_correct"] > best[1]):
                best = (step, acc["context_correct"], {k: v.detach().clone() for k, v in model.state_dict().items()})
            reading = student_reached(acc, ws)
    if best is not None:  # no check met both conditions: the in-band check that read context best
        model.load_state_dict(best[2])
        return best[0], checks, "best_in_band"
    return ws.steps, checks, "cap"


def warm_start(cfg: Config, task, task_templates: dict | None, progress=None):
    """Build (or load from cache) the warm-started tiny model. Returns ``(model, tokenizer, cache_path)``."""
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    path = Path(cfg.warmstart.cache_dir) / cache_key(cfg, task.fingerprint)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return load_cached(path), tok, path
    for d in clean_stale_temporaries(path.parent):
        _say(progress, f"warm start: removed a stale temporary left by a killed run: {d}")

    t0, c0 = time.time(), time.process_time()
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = tiny_llama(len(tok), m.tiny_hidden, m.tiny_layers, m.tiny_heads, m.tiny_intermediate,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = PromptBuilder(tok, cfg.templates, task_templates)
    ws = cfg.warmstart
    step, checks, stopped = _train(model, tok, prompts, task, cfg, progress) if ws.steps > 0 else (0, [], "cap")
    val = validation_examples(task, cfg)
    accuracy = format_accuracies(model, tok, prompts, task, val, cfg)
    record = {"key": path.name, "steps": step, "stopped": stopped, "target_accuracy": ws.target_accuracy,
              "student_max": ws.student_max, "context_target": ws.context_target, "checks": checks,
              "accuracy": accuracy, "validation_size": len(val), "wall_seconds": round(time.time() - t0, 1),
              "cpu_seconds": round(time.process_time() - c0, 1),
              "config": cfg.to_dict()}
    _say(progress, describe(record))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: concurrent builds never share it
    model.save_pretrained(tmp)
    record["weights_sha256"] = sha256_file(tmp / "model.safetensors")  # verified by every later use
    (tmp / "warmstart.json").write_text(json.dumps(record, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # a concurrent run (another node, another process) finished first: use its copy
        if not (path / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return load_cached(path), tok, path


class WarmStartCacheError(ValueError):
    """A cached warm start that is damaged (one line naming the file)."""


def load_cached(path: Path):
    """The cached warm-started model at ``path``, its weights checked against the sha256 recorded
    in ``warmstart.json`` (caches written before it was recorded load unchecked): a flipped byte
    or a truncated file is one line naming the file, never a silently different θ₀."""
    from transformers import LlamaForCausalLM

    from .checkpoint import describe_failure

    weights = Path(path) / "model.safetensors"
    want = read_record(path).get("weights_sha256")
    if want and sha256_file(weights) != want:
        raise WarmStartCacheError(f"{weights}: sha256 differs from the one in {Path(path) / 'warmstart.json'} (the "
                                  f"cached warm start changed after it was written); delete {path} to rebuild it")
    try:
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # SafetensorError, JSON errors, ...: the cache is damaged
        raise WarmStartCacheError(f"{weights}: cannot load the cached warm start ({describe_failure(e)}); delete "
                                  f"{path} to rebuild it") from e
