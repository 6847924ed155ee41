"""Load a model to evaluate: a run checkpoint (verified against its manifest as a resume verifies
it), a LoRA adapter on the base model its run used, a plain model directory, or the configured
policy. The accuracy itself is :mod:`ogls_sd.accuracy`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import MANIFEST, CheckpointError, describe_failure, verify_checkpoint
from .config import Config
from .models import load_policy, load_tokenizer_and_model, peft_without_checkpointing_warning
from .tasks import get_task, task_templates


def load_for_eval(cfg, checkpoint: str | None):
    """``(model, tokenizer, task, task_templates, info)`` for ``checkpoint`` (a run checkpoint or
    a model/adapter directory), or for the configured policy when None."""
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
        with peft_without_checkpointing_warning():
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
            raise CheckpointError(f"--checkpoint {checkpoint}: cannot load the model in {p} ({describe_failure(e)})") from e
        info = {"checkpoint": str(p), "adapter": False}
    task = get_task(cfg.data)
    return model, tok, task, task_templates(task), info


def verify_run_checkpoint(path, given: str) -> None:
    """``ogls-sd eval --checkpoint``: a run checkpoint (``step_N`` or its ``model/``) is verified
    against its manifest exactly as a resume verifies it (a flipped byte, a truncated or missing
    file is one line naming the file); a plain model directory is loaded as it is."""

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
