"""Held-out accuracy of a policy on a task (greedy or sampled), with the training templates."""

from __future__ import annotations

from dataclasses import dataclass

from .data.example import Example
from .rollout import HFBackend, SamplingParams
from .templates import PromptBuilder


@dataclass
class EvalResult:
    accuracy: float
    n: int
    completions: list[str]
    correct: list[bool]
    mean_length: float


def evaluate_accuracy(model, tokenizer, prompts: PromptBuilder, task, examples: list[Example],
                      max_new_tokens: int, batch_size: int = 100, params: SamplingParams | None = None) -> EvalResult:
    """Greedy (default) accuracy of ``model`` on ``examples`` graded by ``task.reward``."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    backend = HFBackend(model, prompts.pad_id, prompts.eos_id, batch_size)
    comps = backend.generate([prompts.student_ids(ex) for ex in examples], params)
    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in comps]
    correct = [task.reward(t, ex.answer) > 0.5 for t, ex in zip(texts, examples)]
    n = len(examples)
    return EvalResult(sum(correct) / max(1, n), n, texts, correct, sum(len(c.ids) for c in comps) / max(1, n))


def evaluate_checkpoint(cfg, checkpoint: str | None) -> EvalResult:
    """Greedy held-out accuracy of ``checkpoint`` (a run checkpoint or model dir), or of the
    configured policy when None, with the configured task and templates."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_policy
    from .tasks import get_task, task_templates

    if checkpoint is None:
        model, tok, task, tpl, _ = load_policy(cfg)
    else:
        p = Path(checkpoint)
        if (p / "model").is_dir():
            p = p / "model"
        if not p.is_dir():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
        if (p / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(p)
        else:
            model = AutoModelForCausalLM.from_pretrained(p)
        tok = AutoTokenizer.from_pretrained(p)
        task = get_task(cfg.data)
        tpl = task_templates(task)
    prompts = PromptBuilder(tok, cfg.templates, tpl)
    examples = task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test")
    return evaluate_accuracy(model, tok, prompts, task, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
