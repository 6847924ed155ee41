"""Held-out accuracy of a policy on a task (greedy or sampled), with the training templates."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .data.example import Example
from .rewards.functions import RewardSet
from .rollout import HFBackend, PromptTooLong, SamplingParams
from .templates import PromptBuilder


def context_limit(model) -> int | None:
    """The model's context (``config.max_position_embeddings``; also through PEFT / DDP wrappers),
    or None when the model does not say."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_prompt_fits(example: Example, kind: str, n_tokens: int, max_new_tokens: int, limit: int | None,
                      setting: str = "rollout.max_new_tokens", where: str = "example") -> None:
    """The one context rule (training rollouts, held-out accuracy, ``ogls-sd eval``): a prompt plus
    the generation limit must fit the model's context, or generation would run past it (transformers
    only warns) or truncate. Raises :class:`~ogls_sd.rollout.PromptTooLong` (a ``ValueError``)
    naming the example, the prompt kind and the setting to change; ``limit`` None or 0 skips it."""
    if limit and n_tokens + max_new_tokens > limit:
        raise PromptTooLong(
            f"{where} {example.id or example.problem[:40]!r}: the {kind} prompt has {n_tokens} tokens; with "
            f"{setting}={max_new_tokens} it exceeds the model's context of {limit} tokens. Lower {setting}, "
            f"shorten templates.{kind}, or filter long problems (data.max_chars)."
        )


def check_eval_prompts(examples: list[Example], prompt_ids: list[list[int]], max_new_tokens: int,
                       limit: int | None, where: str = "held-out example", kind: str = "student") -> None:
    """:func:`check_prompt_fits` for evaluation prompts (``kind`` prompts, ``eval.max_new_tokens``)."""
    for ex, ids in zip(examples, prompt_ids):
        check_prompt_fits(ex, kind, len(ids), max_new_tokens, limit, "eval.max_new_tokens", where)


@dataclass
class EvalResult:
    accuracy: float
    n: int
    completions: list[str]
    correct: list[bool]
    mean_length: float
    rewards: list[float] | None = None  # with reward functions: each completion's reward


def evaluate_accuracy(model, tokenizer, prompts: PromptBuilder, task, examples: list[Example],
                      max_new_tokens: int, batch_size: int = 100, params: SamplingParams | None = None,
                      prompt_ids: list[list[int]] | None = None, kind: str = "student",
                      rewards: RewardSet | None = None) -> EvalResult:
    """Greedy (default) accuracy of ``model`` on ``examples``, from the student prompts or from
    ``prompt_ids`` (one per example; ``kind`` names them in errors, e.g. the warm start's privileged
    and context formats). Graded by ``rewards`` (the run's reward functions: correct = reward >
    ``reward.success_threshold``) or, without them, by ``task.reward`` > 0.5. A prompt that cannot
    fit the model's context with ``max_new_tokens`` is an error (:func:`check_prompt_fits`), before
    anything is generated."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    ids = prompt_ids if prompt_ids is not None else [prompts.student_ids(ex) for ex in examples]
    check_eval_prompts(examples, ids, params.max_new_tokens, context_limit(model), kind=kind)
    backend = HFBackend(model, prompts.pad_id, prompts.eos_id, batch_size)
    comps = backend.generate(ids, params)
    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in comps]
    scores = None
    if rewards is not None:
        shown = [tokenizer.decode(p, skip_special_tokens=False) for p in ids]
        scores = rewards.score(shown, texts, examples)
        correct = rewards.correct(scores)
    else:
        correct = [task.reward(t, ex.answer) > 0.5 for t, ex in zip(texts, examples)]
    n = len(examples)
    return EvalResult(sum(correct) / max(1, n), n, texts, correct, sum(len(c.ids) for c in comps) / max(1, n), scores)


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
    verify_run_checkpoint(p, checkpoint)
    if (p / "model").is_dir():
        p = p / "model"
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel
        from transformers import AutoTokenizer

        base, how = lora_base(p)
        model = PeftModel.from_pretrained(base, p)
        tok = AutoTokenizer.from_pretrained(p)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        info = {"checkpoint": str(p), "adapter": True, "base": how}
    else:
        try:
            tok, model = load_tokenizer_and_model(str(p))
        except Exception as e:  # a truncated / damaged model file: name it
            from .checkpoint import CheckpointError, describe_failure

            raise CheckpointError(f"--checkpoint {checkpoint}: cannot load the model in {p} ({describe_failure(e)})") from e
        info = {"checkpoint": str(p), "adapter": False}
    task = get_task(cfg.data)
    return model, tok, task, task_templates(task), info


def verify_run_checkpoint(path, given: str) -> None:
    """``ogls-sd eval --checkpoint``: a run checkpoint (``step_N`` or its ``model/``) is verified
    against its manifest exactly as a resume verifies it (a flipped byte, a truncated or missing
    file is one line naming the file); a plain model directory is loaded as it is."""
    from pathlib import Path

    from .checkpoint import MANIFEST, CheckpointError, verify_checkpoint

    p = Path(path)
    ckpt = p.parent if p.name == "model" and not (p / "model").is_dir() else p
    if not any((ckpt / f).is_file() for f in (MANIFEST, "state.json", "trainer_state.pt")):
        return  # not a run checkpoint
    try:
        if not verify_checkpoint(ckpt):
            print(f"warning: {ckpt} has no {MANIFEST} (written by an older version): its files cannot be verified",
                  file=sys.stderr)
    except CheckpointError as e:
        raise CheckpointError(f"--checkpoint {given}: {e}") from None


def lora_base(adapter_dir):
    """The base model of a LoRA checkpoint, loaded as the run loaded it: from the run's config in
    the checkpoint's ``state.json`` (model name as the user gave it, ``model.gguf_file``,
    ``model.dtype``; the tiny model's warm start), else from the adapter's
    ``base_model_name_or_path`` (a hub id, a local path or a named model such as
    ``smollm2-135m``). Returns ``(model, description)``."""
    import json
    from pathlib import Path

    from .config import Config
    from .models import load_policy, load_tokenizer_and_model

    adapter_dir = Path(adapter_dir)
    state = adapter_dir.parent / "state.json"
    run_cfg = None
    if state.is_file():
        try:
            run_cfg = json.loads(state.read_text()).get("config")
        except ValueError:
            run_cfg = None
    if isinstance(run_cfg, dict) and isinstance(run_cfg.get("model"), dict):
        cfg = Config.from_dict(run_cfg, source=str(state))
        cfg.model.lora = False
        cfg.model.gradient_checkpointing = False
        base, _, _, _, _ = load_policy(cfg)
        m = cfg.model
        return base, f"{m.name}" + (f" ({m.gguf_file})" if m.gguf_file else "") + f", {m.dtype}, from {state}"
    name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not name:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path, and no run config "
                         f"({state}) to take the base model from")
    _, base = load_tokenizer_and_model(name)
    return base, f"{name}, from {adapter_dir / 'adapter_config.json'}"
