"""FSDP2 sharding (``train.fsdp``, ``ogls_sd.sharding``) with real processes (gloo on CPU, launched
by torchrun): two ranks that hold half of every sharded parameter and half of the prompt groups
must take exactly the optimizer steps one unsharded process takes on the whole batch (float64), for
every algorithm, with LoRA and with gradient checkpointing; the weights pushed to a vLLM engine are
gathered tensor by tensor; and the trainer runs end to end under torchrun, resumes exactly after a
SIGKILL, and takes the data-parallel run's steps."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES
from test_data_parallel import _env, check_ranks_report_the_single_step, run_worker_pair, torchrun_cmd

CASES = {
    "ogls_context": "ogls_sd",  # default anchor: live
    "ogls_global": "ogls_sd,steering.pooling=global,teacher.kind=frozen,steering.tail_weight=0.5",
    "ogls_frozen": "ogls_sd,teacher.kind=frozen",
    "ogls_ema": "ogls_sd,teacher.kind=ema,teacher.ema_decay=0.5",
    "opsd": "opsd",
    "grpo_kl_ppo": "grpo,grpo.kl_coef=0.05,grpo.inner_steps=2",
    "rft": "rft",
    "sft": "sft",
    "ogls_lora": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8",
    "ogls_lora_frozen": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8,teacher.kind=frozen",
    "ogls_lora_ema": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8,teacher.kind=ema,teacher.ema_decay=0.5",
    "opsd_checkpointing": "opsd,model.gradient_checkpointing=true",
    "ogls_lora_checkpointing": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8,model.gradient_checkpointing=true",
    "rlcsd_ppo": "rlcsd,rlcsd.tau=0.5,rlcsd.num_negatives=1,grpo.inner_steps=2",
}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return run_worker_pair(tmp_path_factory.mktemp("fsdp"), CASES, "--fsdp")


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_takes_the_single_process_step(fsdp_runs, case):
    d = fsdp_runs / case
    single = load_file(d / "ws1_rank0.safetensors")
    sharded = load_file(d / "fsdp2_rank0.safetensors")  # gathered from both ranks' shards
    assert sharded.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=1e-9, atol=1e-10, msg=lambda m: f"{case} {k}: {m}")
    check_ranks_report_the_single_step(d, "fsdp2", case)
    for r in (0, 1):  # at rest each rank holds about half of every sharded tensor (dim 0 split in two)
        held = json.loads((d / f"fsdp2_rank{r}.held.json").read_text())
        assert held["total"] > 0 and held["local"] <= held["total"] // 2 + 64 * 32, held


@pytest.mark.parametrize("case", ["ogls_context", "ogls_lora"])
def test_vllm_push_under_fsdp_gathers_the_trained_weights(fsdp_runs, case):
    """The colocated engine receives the full trained weights (LoRA merged) under vLLM names, each
    gathered from the shards one tensor at a time (vllm_backend.full_weights)."""
    from ogls_sd.rollout.vllm_backend import hf_to_vllm_name

    d = fsdp_runs / case
    single = load_file(d / "ws1_rank0.safetensors")
    pushed = load_file(d / "fsdp2_rank0.vllm.safetensors")
    if case == "ogls_lora":  # merged: W + (alpha / r) B A of the single process's adapter
        name = next(k for k in single if k.endswith("q_proj.base_layer.weight"))
        pre = name[: -len("base_layer.weight")]
        merged = single[name] + (8 / 4) * single[pre + "lora_B.default.weight"] @ single[pre + "lora_A.default.weight"]
        torch.testing.assert_close(pushed[hf_to_vllm_name(name)], merged, rtol=1e-9, atol=1e-10)
        assert not any("lora_" in k for k in pushed)
    else:
        want = {hf_to_vllm_name(k): v for k, v in single.items() if hf_to_vllm_name(k)}
        assert pushed.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(pushed[k], want[k], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- the trainer
STEPS = 4
VOLATILE = ("time/", "throughput/")


def _train_cmd(out: Path, ws: Path, *extra: str) -> list[str]:
    over = [o for o in TINY_OVERRIDES if not o.startswith(("train.steps=", "train.prompts_per_step=", "model.tiny_layers="))]
    return ["-m", "ogls_sd.cli", "train", *over, "model.tiny_layers=2", f"warmstart.cache_dir={ws}",
            f"train.steps={STEPS}", "train.prompts_per_step=4", "train.save_every=1", "train.keep_last=10",
            "steering.no_positive=reference", "eval.before_after=false", "eval.every=2", "eval.benchmarks=task",
            "-o", str(out), *extra]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _weights(run: Path) -> dict:
    return load_file(run / "checkpoints" / f"step_{STEPS:06d}" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """README "Scaling out" with train.fsdp=true under torchrun: an uninterrupted run, the same run
    killed (SIGKILL to every process) after its step-2 checkpoint and resumed, and the data-parallel
    run of the same config."""
    tmp = tmp_path_factory.mktemp("fsdp_train")
    ws = tmp / "ws"
    full, cut, dp = tmp / "full", tmp / "cut", tmp / "dp"
    env = dict(_env(), PYTHONUNBUFFERED="1")
    res = subprocess.run(torchrun_cmd(2, *_train_cmd(full, ws, "train.fsdp=true")), cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    proc = subprocess.Popen(torchrun_cmd(2, *_train_cmd(cut, ws, "train.fsdp=true")), cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    target = cut / "checkpoints" / "step_000002"
    deadline = time.time() + 300
    while not target.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert target.is_dir(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, during step 3 (or its checkpoint)
    proc.wait(timeout=60)
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    res = subprocess.run(torchrun_cmd(2, *_train_cmd(cut, ws, "train.fsdp=true", "--resume", "latest")), cwd=tmp,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    res = subprocess.run(torchrun_cmd(2, *_train_cmd(dp, ws)), cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return full, cut, dp


def test_trainer_under_fsdp_writes_a_loadable_checkpoint(trainer_runs):
    full, _, _ = trainer_runs
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == STEPS
    ck = full / "checkpoints" / f"step_{STEPS:06d}"
    assert (ck / "model" / "config.json").is_file() and (ck / "sharded").is_dir()
    assert [r["step"] for r in _metrics(full) if "loss" in r] == list(range(1, STEPS + 1))
    assert (full / "eval" / "step_000002" / "results.json").is_file()  # eval.benchmarks during an FSDP2 run
    assert any(r.get("grad_norm") for r in _metrics(full))  # not a run of no-op steps
    # the full weights, as from_pretrained reads them (what ogls-sd eval and a hub upload use)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ck / "model")
    w = _weights(full)
    for k, v in m.state_dict().items():
        if k in w:
            assert torch.equal(v, w[k]), k


def test_fsdp_kill_and_resume_is_exact(trainer_runs):
    full, cut, _ = trainer_runs
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(full) == _metrics(cut)


def test_fsdp_trainer_takes_the_data_parallel_steps(trainer_runs):
    """Same config, 2 processes: FSDP2 (gathered step, reduce-scatter) and data parallel
    (replicas, all-reduce) sample the same rollouts and take the same steps (float32)."""
    full, _, dp = trainer_runs
    a, b = _weights(full), _weights(dp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    ma, mb = _metrics(full), _metrics(dp)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra.get("reward/mean") == rb.get("reward/mean")
        if "loss" in ra:
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-7)


def test_fsdp_needs_several_processes(tiny_cfg):
    from ogls_sd.trainer import train

    with pytest.raises(ValueError, match=r"train\.fsdp=true shards across processes"):
        train(tiny_cfg("train.fsdp=true"))
