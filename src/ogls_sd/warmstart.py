"""Warm start of the built-in tiny model: a short SFT so that it solves some problems alone and has
learned to read every context template the algorithms use.

The SFT mix (fractions from ``warmstart``), with ``y*`` the privileged reference and ``ŷ`` the
same solution in the student's own style (``task.plain_reference``; ``ŷ = y*`` unless the task
writes its references in another template, as ``arith_style=templated`` does):

* student format: ``student_prompt(x) -> ŷ``;
* privileged format: ``teacher_prompt(x, y*) -> y*`` (the model learns to use a reference — and,
  when ``y*`` is templated, to reproduce its template: the teacher "drifts toward that template");
* earlier-attempt format (OGLS-SD context pooling): ``context_prompt(x, a) -> ŷ`` where the
  attempt ``a`` is right (``ŷ``) or wrong (a plausible carry error, plain) with equal probability.

The result is cached under ``warmstart.cache_dir/<hash>`` (hash of everything that determines it)
and loaded from there on later runs.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .config import Config
from .data.example import Example
from .templates import PromptBuilder
from .tiny import char_tokenizer, tiny_llama

CACHE_VERSION = 1


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


def warm_start(cfg: Config, task, task_templates: dict | None, progress=None):
    """Build (or load from cache) the warm-started tiny model. Returns ``(model, tokenizer, cache_path)``."""
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    path = Path(cfg.warmstart.cache_dir) / cache_key(cfg)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32), tok, path

    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = tiny_llama(len(tok), m.tiny_hidden, m.tiny_layers, m.tiny_heads, m.tiny_intermediate,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = PromptBuilder(tok, cfg.templates, task_templates)
    ws = cfg.warmstart
    if ws.steps > 0:
        rng = random.Random(f"warmstart/{cfg.train.seed}")
        opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # warm-up, then constant
        model.train()
        task_id = progress.add_task("warm start (SFT)", total=ws.steps, info="") if progress else None
        for step in range(ws.steps):
            exs = task.examples(ws.batch_size, seed=cfg.data.seed * 100003 + step + 1_000_000, split="train")
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
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: concurrent builds never share it
    model.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps({"key": path.name, "config": cfg.to_dict()}, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # a concurrent run (another node, another process) finished first: use its copy
        if not (path / "model.safetensors").is_file():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32), tok, path
