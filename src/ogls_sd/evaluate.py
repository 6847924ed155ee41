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


def load_for_eval(cfg, checkpoint: str | None):
    """``(model, tokenizer, task, task_templates, info)`` for ``checkpoint`` (a run checkpoint or
    a model/adapter directory), or for the configured policy when None."""
    from pathlib import Path

    from .models import load_policy, load_tokenizer_and_model
    from .tasks import get_task, task_templates

    if checkpoint is None:
        model, tok, task, tpl, info = load_policy(cfg)
        return model, tok, task, tpl, info
    p = Path(checkpoint)
    if (p / "model").is_dir():
        p = p / "model"
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    if (p / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(p)
        tok = AutoTokenizer.from_pretrained(p)
        info = {"checkpoint": str(p), "adapter": True}
    else:
        tok, model = load_tokenizer_and_model(str(p))
        info = {"checkpoint": str(p), "adapter": False}
    task = get_task(cfg.data)
    return model, tok, task, task_templates(task), info
