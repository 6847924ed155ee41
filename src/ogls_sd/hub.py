"""Upload a checkpoint's model to the Hugging Face hub (``train.push_to_hub``, ``ogls-sd push``).

What goes up is the checkpoint's ``model/`` directory as ``from_pretrained`` reads it: the full
weights (safetensors) or the LoRA adapter, the tokenizer, and a model card (``README.md``) written
of the run (algorithm, base model, steps, held-out accuracy; written with every checkpoint). Optimizer state,
RNG states and shards stay local. ``train.push_to_hub`` is checked before any model is loaded (hub
reachable, logged in), so a run never trains for hours and then fails to upload; an upload that
fails after training names the saved checkpoint and the command that retries it.
"""

from __future__ import annotations

from pathlib import Path


class HubError(RuntimeError):
    """The hub cannot be used (offline, not logged in, upload failed); the message is one line."""


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def check_hub(repo_id: str) -> str:
    """Before training: the hub is reachable and a token is set. Returns the user name."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"train.push_to_hub={repo_id}: HF_HUB_OFFLINE=1 is set; unset it (and log in with "
                       "`huggingface-cli login` or HF_TOKEN), or push later with `ogls-sd push CHECKPOINT REPO_ID`")
    if "/" not in repo_id:
        raise HubError(f"train.push_to_hub={repo_id}: expected a repository id like user/name")
    try:
        return _api().whoami()["name"]
    except Exception as e:  # no token, bad token, no network: all one line
        raise HubError(f"train.push_to_hub={repo_id}: cannot use the hub ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]}); log in with `huggingface-cli login` or set HF_TOKEN") from e


def model_card(run_name: str, step: int, config: dict, summary: dict | None = None) -> str:
    """A short model card (``README.md`` of a checkpoint's ``model/``; written with every checkpoint)."""
    model, train = config.get("model") or {}, config.get("train") or {}
    lora = bool(model.get("lora"))
    lines = ["---", "library_name: " + ("peft" if lora else "transformers"), "tags:", "- ogls-sd",
             f"- {train.get('algorithm', 'ogls_sd')}", "---", "", f"# {run_name} (step {step})", "",
             f"Trained with ogls-sd, algorithm `{train.get('algorithm', '?')}`, from `{model.get('name', '?')}`"
             + (" (a LoRA adapter)" if lora else "") + f": {step} optimizer steps on "
             f"`{(config.get('data') or {}).get('task', '?')}`.", ""]
    for k in ("accuracy_before", "accuracy_after"):
        if k in (summary or {}):
            lines.append(f"- held-out greedy accuracy {k.split('_')[1]} training: {summary[k]:.3f}")
    lines += ["", "The full training configuration is in the checkpoint's `state.json` (`config`)."]
    return "\n".join(lines) + "\n"


def push_checkpoint(ckpt: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload ``ckpt/model`` (a run checkpoint, whose model card was written with it, or a model
    directory itself) to ``repo_id``, unchanged; returns the repository URL."""
    ckpt = Path(ckpt)
    folder = ckpt / "model" if (ckpt / "model").is_dir() else ckpt
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise HubError(f"push: {folder} is not a model directory (no *.safetensors)")
    api = _api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message=f"ogls-sd: {folder.parent.name if folder.name == 'model' else folder.name}")
    except Exception as e:
        raise HubError(f"uploading {folder} to {repo_id} failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                       f"the checkpoint is kept; retry with `ogls-sd push {ckpt} {repo_id}`") from e
    return f"https://huggingface.co/{repo_id}"
