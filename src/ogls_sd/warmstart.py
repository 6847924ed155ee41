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

Training stops once the student's greedy accuracy on ``warmstart.check_size`` validation problems
reaches ``warmstart.target_accuracy`` (checked every ``warmstart.check_every`` steps), at the latest
after ``warmstart.steps``. At the end the greedy accuracy of every format is measured on the same
validation problems (:func:`format_accuracies`: student, privileged, context with a correct attempt,
context with a wrong attempt), printed, and stored in ``warmstart.json`` next to the weights.

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

from .config import Config
from .data.example import Example
from .templates import PromptBuilder
from .tiny import char_tokenizer, tiny_llama

CACHE_VERSION = 2  # 2: stops on an accuracy target, records per-format accuracies, varied wrong attempts


def cache_key(cfg: Config) -> str:
    d = cfg.to_dict()
    keep = {
        "v": CACHE_VERSION,
        "model": {k: v for k, v in d["model"].items() if k.startswith("tiny_") or k == "name"},
        "data": {k: v for k, v in d["data"].items() if k.startswith("arith_") or k in ("task", "seed")},
        "warmstart": {k: v for k, v in d["warmstart"].items() if k != "cache_dir"},
        "templates": d["templates"],
        "seed": d["train"]["seed"],
    }
    if keep["data"].get("arith_style", "plain") == "plain":  # caches made before the style existed stay valid
        keep["data"].pop("arith_style", None)
    import hashlib

    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def plain_reference(task, ex: Example) -> str:
    """``ex``'s solution in the student's own style (the task's ``plain_reference`` hook, if any)."""
    hook = getattr(task, "plain_reference", None)
    return hook(ex) if hook is not None else ex.reference


def sft_pairs(task, prompts: PromptBuilder, examples: list[Example], cfg: Config, rng: random.Random):
    """Yield ``(kind, prompt_ids, target_ids)`` of the warm-start mix; kind is student|privileged|context."""
    ws = cfg.warmstart
    for ex in examples:
        plain = plain_reference(task, ex)
        u = rng.random()
        if u < ws.student_fraction:
            kind, p, sol = "student", prompts.student_ids(ex), plain
        elif u < ws.student_fraction + ws.reference_fraction:
            kind, p, sol = "privileged", prompts.teacher_ids(ex), ex.reference  # templated stays templated
        else:
            attempt = plain if rng.random() < 0.5 else task.wrong_attempt(ex, rng)
            kind, sol = "context", plain
            p = prompts.context_ids(ex, prompts.text_ids(attempt), cfg.steering.max_context_tokens)
        yield kind, p, prompts.text_ids(sol) + [prompts.eos_id]


def _sft_pairs(task, prompts: PromptBuilder, examples: list[Example], cfg: Config, rng: random.Random):
    for _, p, t in sft_pairs(task, prompts, examples, cfg, rng):
        yield p, t


FORMATS = ("student", "privileged", "context_correct", "context_wrong")
TEMPLATE_OF = {"student": "student", "privileged": "teacher", "context_correct": "context", "context_wrong": "context"}


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
    per problem, seeded). The generation budget is ``eval.max_new_tokens`` (twice that for the
    privileged format, whose templated references are longer). Each format is scored by
    :func:`ogls_sd.evaluate.evaluate_accuracy` (same context check, same grading).
    """
    from .evaluate import evaluate_accuracy

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
        n = cfg.eval.max_new_tokens * (2 if fmt == "privileged" else 1)
        out[fmt] = evaluate_accuracy(model, tok, prompts, task, examples, n, cfg.eval.batch_size,
                                     prompt_ids=ps, kind=TEMPLATE_OF[fmt]).accuracy
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


def warm_start(cfg: Config, task, task_templates: dict | None, progress=None):
    """Build (or load from cache) the warm-started tiny model. Returns ``(model, tokenizer, cache_path)``."""
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    path = Path(cfg.warmstart.cache_dir) / cache_key(cfg)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return load_cached(path), tok, path
    for d in clean_stale_temporaries(path.parent):
        _say(progress, f"warm start: removed a stale temporary left by a killed run: {d}")

    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = tiny_llama(len(tok), m.tiny_hidden, m.tiny_layers, m.tiny_heads, m.tiny_intermediate,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = PromptBuilder(tok, cfg.templates, task_templates)
    ws = cfg.warmstart
    val = validation_examples(task, cfg)
    checks: list[dict] = []
    step = 0
    if ws.steps > 0:
        rng = random.Random(f"warmstart/{cfg.train.seed}")
        opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # warm-up, then constant
        model.train()
        task_id = progress.add_task("warm start (SFT)", total=ws.steps, info="") if progress else None
        for step in range(1, ws.steps + 1):
            exs = task.examples(ws.batch_size, seed=cfg.data.seed * 100003 + step - 1 + 1_000_000, split="train")
            pairs = list(_sft_pairs(task, prompts, exs, cfg, rng))
            width = max(len(p) + len(t) for p, t in pairs)
            ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(pairs), width), -100, dtype=torch.long)
            att = torch.zeros((len(pairs), width), dtype=torch.long)
            for r, (p, t) in enumerate(pairs):
                seq = p + t
                ids[r, : len(seq)] = torch.tensor(seq)
                att[r, : len(seq)] = 1
                labels[r, len(p) : len(seq)] = torch.tensor(t)
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if progress:
                progress.update(task_id, advance=1, description=f"warm start (SFT) loss {loss.item():.3f}")
            if ws.target_accuracy > 0 and step % ws.check_every == 0 and step < ws.steps:
                acc = format_accuracies(model, tok, prompts, task, val, cfg, formats=("student",))["student"]
                model.train()
                checks.append({"step": step, "student": acc})
                _say(progress, f"warm start: step {step}/{ws.steps}, loss {loss.item():.3f}, student greedy accuracy "
                               f"{100 * acc:.1f}% (target {100 * ws.target_accuracy:.0f}%)")
                if acc >= ws.target_accuracy:
                    break
    accuracy = format_accuracies(model, tok, prompts, task, val, cfg)
    record = {"key": path.name, "steps": step, "target_accuracy": ws.target_accuracy, "checks": checks,
              "accuracy": accuracy, "validation_size": len(val), "config": cfg.to_dict()}
    _say(progress, describe(record))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: concurrent builds never share it
    model.save_pretrained(tmp)
    record["weights_sha256"] = _sha256(tmp / "model.safetensors")  # verified by every later use
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cached(path: Path):
    """The cached warm-started model at ``path``, its weights checked against the sha256 recorded
    in ``warmstart.json`` (caches written before it was recorded load unchecked): a flipped byte
    or a truncated file is one line naming the file, never a silently different θ₀."""
    from transformers import LlamaForCausalLM

    from .checkpoint import describe_failure

    weights = Path(path) / "model.safetensors"
    want = read_record(path).get("weights_sha256")
    if want and _sha256(weights) != want:
        raise WarmStartCacheError(f"{weights}: sha256 differs from the one in {Path(path) / 'warmstart.json'} (the "
                                  f"cached warm start changed after it was written); delete {path} to rebuild it")
    try:
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # SafetensorError, JSON errors, ...: the cache is damaged
        raise WarmStartCacheError(f"{weights}: cannot load the cached warm start ({describe_failure(e)}); delete "
                                  f"{path} to rebuild it") from e
