"""Load the policy: the built-in tiny model (warm-started, cached) or any causal LM from the hub or
a local path (optionally a GGUF file), with an optional LoRA adapter."""

from __future__ import annotations

import torch

from .config import Config
from .tasks import get_task, task_templates

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(cfg: Config, progress=None):
    """Returns ``(policy, tokenizer, task, task_templates, info)``; ``info`` describes the model."""
    task = get_task(cfg.data)
    tpl = task_templates(task)
    m = cfg.model
    if m.name == "tiny":
        from .warmstart import warm_start

        model, tok, path = warm_start(cfg, task, tpl, progress)
        info = {"name": "tiny", "warm_start": str(path)}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(trust_remote_code=m.trust_remote_code)
        if m.gguf_file:
            kw["gguf_file"] = m.gguf_file
        tok = AutoTokenizer.from_pretrained(m.name, **kw)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(m.name, dtype=DTYPES[m.dtype], **kw)
        info = {"name": m.name, "gguf_file": m.gguf_file}
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if m.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                 target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM"))
        info["lora"] = {"r": m.lora_r, "alpha": m.lora_alpha, "target_modules": list(m.lora_target_modules)}
    return model, tok, task, tpl, info
