"""LoRA checkpoints are portable and loadable (issue 14 item 4): the adapter names the base model
as the user did, and ``ogls-sd eval --checkpoint`` on a LoRA checkpoint loads the base the run used
(the run's model settings in ``state.json``: name, GGUF file, dtype, the tiny warm start), or the
adapter's ``base_model_name_or_path`` for a bare adapter directory."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ogls_sd.loading import load_for_eval
from ogls_sd.tiny import char_tokenizer
from ogls_sd.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = ["model.lora=true", "model.lora_r=4", "model.lora_alpha=8", "steering.no_positive=reference",
        "eval.before_after=false", "eval.every=0"]


def _merged_by_hand(base: dict, adapter: dict, scale: float) -> dict:
    """base weights + scale * B @ A for every adapted module (independent of peft's merge)."""
    out = dict(base)
    for k in adapter:
        if ".lora_A." not in k:
            continue
        mod = k.split("base_model.model.", 1)[1].split(".lora_A.")[0]
        b = adapter[k.replace(".lora_A.", ".lora_B.")]
        out[mod + ".weight"] = base[mod + ".weight"] + scale * b.double() @ adapter[k].double()
    return out


def _merged_loaded(model) -> dict:
    return {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}


def _check(model, base_sd: dict, ckpt):
    adapter = load_file(ckpt / "model" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # the step trained the adapter
    want = _merged_by_hand({k: v.double() for k, v in base_sd.items()}, adapter, 8 / 4)
    got = _merged_loaded(model)
    for k, v in want.items():
        if k in got:
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_tiny_lora_checkpoint_evaluates_on_its_warm_start(tiny_cfg):
    cfg = tiny_cfg(*LORA)
    summ = train(cfg)
    ckpt = Path(summ["checkpoint"])
    ws = summ["model"]["warm_start"]
    model, tok, task, tpl, info = load_for_eval(cfg, str(ckpt))
    assert info["adapter"] and "tiny" in info["base"]
    _check(model, load_file(f"{ws}/model.safetensors"), ckpt)


def test_local_model_lora_checkpoint_names_the_base_as_given_and_loads_it(tiny_cfg, tmp_path):
    tok = char_tokenizer()
    from conftest import peaked_tiny_llama

    base_dir = tmp_path / "my-base"
    peaked_tiny_llama(tok).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    cfg = tiny_cfg(*LORA, f"model.name={base_dir}")
    summ = train(cfg)
    ckpt = Path(summ["checkpoint"])
    ac = json.loads((ckpt / "model" / "adapter_config.json").read_text())
    assert ac["base_model_name_or_path"] == str(base_dir)
    base_sd = load_file(base_dir / "model.safetensors")
    model, *_ , info = load_for_eval(cfg, str(ckpt))
    assert info["base"].startswith(str(base_dir)) and "state.json" in info["base"]
    _check(model, base_sd, ckpt)
    # a bare adapter directory (no run state next to it): the base from adapter_config.json
    bare = tmp_path / "bare" / "adapter"
    shutil.copytree(ckpt / "model", bare)
    model, *_, info = load_for_eval(cfg, str(bare))
    assert "adapter_config.json" in info["base"]
    _check(model, base_sd, ckpt)


def test_lora_base_uses_the_runs_gguf_file_and_dtype(tmp_path, monkeypatch):
    """A run on a GGUF model: the base is loaded with the run's model.gguf_file and model.dtype
    (what failed before: the adapter was loaded without them)."""
    import ogls_sd.models as models
    from conftest import peaked_tiny_llama
    from ogls_sd.loading import lora_base

    calls = []

    def fake(name, gguf_file="", dtype="float32", trust_remote_code=False):
        calls.append((name, gguf_file, dtype))
        tok = char_tokenizer()
        return tok, peaked_tiny_llama(tok)

    monkeypatch.setattr(models, "load_tokenizer_and_model", fake)
    ck = tmp_path / "step_000001"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/some-gguf-repo"}))
    from ogls_sd.config import Config

    run_cfg = Config.load(None, ["model.name=org/some-gguf-repo", "model.gguf_file=model.Q4_1.gguf",
                                 "model.dtype=bfloat16", "model.lora=true"]).to_dict()
    (ck / "state.json").write_text(json.dumps({"format": 2, "step": 1, "config": run_cfg}))
    base, how = lora_base(ck / "model")
    assert calls == [("org/some-gguf-repo", "model.Q4_1.gguf", "bfloat16")]
    assert "model.Q4_1.gguf" in how and not hasattr(base, "peft_config")
