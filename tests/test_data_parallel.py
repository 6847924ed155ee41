"""Data parallelism with real processes (gloo on CPU, launched by torchrun): two ranks that each
hold half of the prompt groups must take exactly the optimizer steps one process takes on the
whole batch (global loss normalisers, summed gradients, global clipping), for every algorithm;
and the trainer must run end to end under torchrun, writing its outputs once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_dp_worker.py")
CASES = {
    "ogls_context": "ogls_sd",  # default anchor: live
    "ogls_frozen": "ogls_sd,teacher.kind=frozen",
    "ogls_ema_fast": "ogls_sd,teacher.kind=ema,teacher.ema_decay=0.5",
    "ogls_global_ema": "ogls_sd,steering.pooling=global,teacher.kind=ema,steering.tail_weight=0.5",
    "opsd": "opsd",
    "grpo_kl_ppo": "grpo,grpo.kl_coef=0.05,grpo.inner_steps=2",
    "grpo_seq": "grpo,grpo.reduction=sequence_mean",
    "opsd_grpo": "opsd_grpo",
    "rft": "rft",
    "sft": "sft",
    "ogls_lora": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8",  # live: adapter enabled
    "ogls_lora_frozen": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8,teacher.kind=frozen",
    "ogls_lora_ema": "ogls_sd,model.lora=true,model.lora_r=4,model.lora_alpha=8,teacher.kind=ema,teacher.ema_decay=0.5",
    "opsd_checkpointing": "opsd,model.gradient_checkpointing=true",
    # K = 1 of 2 incorrect siblings: the hint draws must not depend on which groups a rank holds
    "rlcsd_ppo": "rlcsd,rlcsd.tau=0.5,rlcsd.num_negatives=1,grpo.inner_steps=2",
}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(n: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` with ``n`` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


def _torchrun(n: int, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(n, *args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_worker_pair(out: Path, cases: dict, *flags: str) -> Path:
    """``_dp_worker.py`` on every case: once in one process, once under torchrun with 2 (``flags``
    such as ``--fsdp`` apply to the 2-process run)."""
    specs = [f"{k}={v}" for k, v in cases.items()]
    one = subprocess.run([sys.executable, str(WORKER), str(out), *specs], cwd=out, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, str(WORKER), *flags, str(out), *specs, cwd=out)
    assert two.returncode == 0, two.stderr[-3000:]
    return out


def check_ranks_report_the_single_step(d: Path, tag: str, case: str) -> None:
    """The steps did something (so that weight equality is not vacuous), and both ranks of the
    2-process run ``tag`` report the single process's gradient norm and loss terms (sums over ranks)."""
    gn = float((d / "ws1_rank0.gradnorm").read_text())
    assert gn > 0
    agg1 = json.loads((d / "ws1_rank0.agg.json").read_text())
    for r in (0, 1):
        assert float((d / f"{tag}_rank{r}.gradnorm").read_text()) == pytest.approx(gn, rel=1e-9)
        agg2 = json.loads((d / f"{tag}_rank{r}.agg.json").read_text())
        assert agg2.keys() == agg1.keys()
        for k in agg1:
            assert agg2[k] == pytest.approx(agg1[k], rel=1e-9, abs=1e-12), (case, k)


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    return run_worker_pair(tmp_path_factory.mktemp("dp"), CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_take_the_single_process_step(dp_runs, case):
    single = load_file(dp_runs / case / "ws1_rank0.safetensors")
    r0 = load_file(dp_runs / case / "ws2_rank0.safetensors")
    r1 = load_file(dp_runs / case / "ws2_rank1.safetensors")
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"{case}: replicas diverged at {k}"
        torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-10, msg=lambda m: f"{case} {k}: {m}")
    check_ranks_report_the_single_step(dp_runs / case, "ws2", case)


def test_trainer_runs_under_torchrun_and_writes_once(tmp_path):
    """README "Scaling out", the CPU try-out: torchrun with 2 processes (accelerate launch starts
    several CPU processes only through MPI, so GPU-free tests use torchrun; the trainer is the same)."""
    from conftest import TINY_OVERRIDES

    run = tmp_path / "run"
    over = [o for o in TINY_OVERRIDES if not o.startswith(("train.steps=", "train.prompts_per_step="))]
    res = _torchrun(2, "-m", "ogls_sd.cli", "train", *over, "train.steps=2", "train.prompts_per_step=4",
                    f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={run}", "train.save_every=1", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and "accuracy_after" in summary
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # rank 0 writes, once per step
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows if "loss" in r)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert len(list((tmp_path / "ws").iterdir())) == 1  # one warm start, computed by rank 0 and shared


def test_prompts_must_divide_among_processes(tmp_path):
    over = ["train.prompts_per_step=3", f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={tmp_path / 'run'}",
            "warmstart.steps=1", "train.steps=1", "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2",
            "model.tiny_intermediate=64", "data.eval_size=2", "eval.before_after=false"]
    res = _torchrun(2, "-m", "ogls_sd.cli", "train", *over, cwd=tmp_path)
    assert res.returncode != 0
    assert "train.prompts_per_step=3 must be divisible by the number of processes (2)" in res.stdout + res.stderr


def test_gradient_buckets_cover_every_parameter_once(tmp_path):
    """sum_gradients in small buckets of mixed dtypes, 2 gloo processes: every gradient is the sum."""
    script = tmp_path / "buckets.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from ogls_sd.distributed import sum_gradients\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "shapes = [(3, 4), (7,), (2, 2), (50,), (1,), (5, 3)]\n"
        "ps = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64 if i % 3 == 0 else torch.float32)) for i, s in enumerate(shapes)]\n"
        "for i, p in enumerate(ps):\n"
        "    if not (r == 1 and i == 4):  # rank 1 has no gradient for parameter 4\n"
        "        p.grad = torch.arange(p.numel(), dtype=p.dtype).view_as(p) * (r + 1) + i\n"
        "sum_gradients(ps, bucket_numel=16)\n"
        "for i, p in enumerate(ps):\n"
        "    base = torch.arange(p.numel(), dtype=p.dtype).view_as(p)\n"
        "    want = base + i if i == 4 else base * 3 + 2 * i\n"
        "    assert torch.equal(p.grad, want), (r, i, p.grad, want)\n"
        "print('ok', r)\n"
        "from ogls_sd.distributed import shutdown\n"
        "shutdown()\n")
    res = _torchrun(2, str(script), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 2


def test_deepspeed_is_refused_with_a_clear_error(tiny_cfg, monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    from ogls_sd.trainer import train

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(NotImplementedError, match=r"DEEPSPEED is not supported.*fsdp\.yaml.*ddp\.yaml"):
        train(tiny_cfg())


def test_accelerate_fsdp_turns_sharding_on(tiny_cfg, monkeypatch):
    """An accelerate FSDP launch means train.fsdp (here with one process: the clear refusal)."""
    import accelerate
    from accelerate.utils import DistributedType

    from ogls_sd.trainer import train

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match=r"train\.fsdp=true shards across processes"):
        train(tiny_cfg())
