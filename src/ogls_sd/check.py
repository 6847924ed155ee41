"""``ogls-sd check``: resolve and validate a config, its reward functions, its data and its model's
context limit without training. Nothing is written and no weights are loaded (the model's config
and tokenizer only), so a preset swapped to another model shows all its problems at once instead of
one per failed run."""

from __future__ import annotations

from .accuracy import check_eval_prompts, check_prompt_fits
from .config import Config, ConfigError
from .models import resolve_model
from .rewards.functions import RewardError, resolve
from .tasks import get_task, task_templates
from .templates import PromptBuilder


def tokenizer_and_context(cfg: Config):
    """``(tokenizer, context limit)`` of the configured model, without its weights."""
    m = cfg.model
    if m.name == "tiny":
        from .tiny import TINY_CONTEXT, char_tokenizer

        return char_tokenizer(), TINY_CONTEXT
    from transformers import AutoConfig, AutoTokenizer

    name, gguf = resolve_model(m.name, m.gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=m.trust_remote_code, **kw)
    conf = AutoConfig.from_pretrained(name, trust_remote_code=m.trust_remote_code, **kw)
    return tok, getattr(conf, "max_position_embeddings", None)


def check(cfg: Config, model: bool = True) -> list[str]:
    """What ``ogls-sd check`` reports, one line each; raises on the first problem (a one-line error
    naming the key, file or example)."""
    try:
        specs = resolve(cfg.reward.funcs)
    except RewardError as e:
        raise ConfigError(str(e)) from None
    lines = [f"config: ok (train.algorithm={cfg.train.algorithm}, {cfg.train.steps} steps of "
             f"{cfg.train.prompts_per_step} prompts x {cfg.rollout.num_generations} rollouts)",
             "rewards: " + (", ".join(f"{s.label}={s.weight:g}" for s in specs) if specs else "the task's verifier")
             + f" (correct: reward > {cfg.reward.success_threshold:g})"]
    task = get_task(cfg.data)
    lines.append(task.describe())
    if not model:
        return lines
    tok, limit = tokenizer_and_context(cfg)
    prompts = PromptBuilder(tok, cfg.templates, task_templates(task))
    heldout = task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test")
    check_eval_prompts(heldout, [prompts.student_ids(ex) for ex in heldout], cfg.eval.max_new_tokens, limit)
    longest = 0
    for step in range(min(cfg.train.steps, 50)):  # the prompts of the first steps, as training draws them
        for ex in task.examples(cfg.train.prompts_per_step, seed=cfg.data.seed * 1_000_003 + step, split="train"):
            for kind, ids in (("student", prompts.student_ids(ex)), ("teacher", prompts.teacher_ids(ex))):
                check_prompt_fits(ex, kind, len(ids), cfg.rollout.max_new_tokens, limit)
                longest = max(longest, len(ids))
    lines.append(f"model: {cfg.model.name}, context {limit or 'unknown'} tokens; the longest training prompt "
                 f"(first {min(cfg.train.steps, 50)} steps) has {longest} tokens + rollout.max_new_tokens="
                 f"{cfg.rollout.max_new_tokens}; the {len(heldout)} held-out prompts fit with eval.max_new_tokens="
                 f"{cfg.eval.max_new_tokens}")
    return lines
